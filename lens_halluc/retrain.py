"""``python -m lens_halluc.retrain``: the command line in :mod:`lens_halluc.cli.retrain` (run it with ``--help``)."""
from .cli.retrain import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
