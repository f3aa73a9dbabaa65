"""``python -m recipes.release model|dataset <folder> --repo-id <org/name> ...`` (see ``cli``)."""

from recipes.release.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
