"""`python -m dataset_builders <stage> ...`: one subcommand per data stage (see `--help`)."""

import sys

from .cli import main

# Mistakes in the command (a missing folder or model path, a bad rule, an output made with other settings) end with
# one clear line and exit status 2, not a traceback. OSError: what transformers raises for a model it cannot find.
USER_ERRORS = (OSError, ValueError)

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except USER_ERRORS as error:
        stage = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        print(f"python -m dataset_builders {stage}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
