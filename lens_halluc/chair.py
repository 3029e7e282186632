"""``python -m lens_halluc.chair``: the command line in :mod:`lens_halluc.cli.chair` (run it with ``--help``)."""
from .cli.common import callable_module
from .cli.chair import build_parser, main  # noqa: F401

# `lh.chair(...)` is the API function; importing this entry point must not shadow it
callable_module(__name__, "lens_halluc.data.chair:chair")


if __name__ == "__main__":
    main()
