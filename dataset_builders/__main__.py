"""`python -m dataset_builders <stage> ...`: one subcommand per data stage (see `--help`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
