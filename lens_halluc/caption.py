"""``python -m lens_halluc.caption``: the command line in :mod:`lens_halluc.cli.caption` (run it with ``--help``)."""
from .cli.common import callable_module
from .cli.caption import build_parser, main  # noqa: F401

# `lh.caption(...)` is the API function; importing this entry point must not shadow it
callable_module(__name__, "lens_halluc.generation.runner:caption")


if __name__ == "__main__":
    main()
