"""The one error the release tool raises: a folder that cannot be released as it is."""


class ReleaseError(ValueError):
    """The folder cannot be released as it is; the message says what is missing or wrong."""
