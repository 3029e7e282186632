"""``python -m lens_halluc.attribute``: the command line in :mod:`lens_halluc.cli.attribute` (run it with ``--help``)."""
from .cli.attribute import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
