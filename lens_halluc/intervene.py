"""``python -m lens_halluc.intervene``: the command line in :mod:`lens_halluc.cli.intervene` (run it with ``--help``)."""
from .cli.intervene import build_parser, columns, main, read_rows  # noqa: F401

if __name__ == "__main__":
    main()
