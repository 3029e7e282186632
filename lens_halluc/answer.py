"""``python -m lens_halluc.answer``: the command line in :mod:`lens_halluc.cli.answer` (run it with ``--help``)."""
from .cli.common import callable_module
from .cli.answer import build_parser, main  # noqa: F401

# `lh.answer(...)` is the API function; importing this entry point must not shadow it
callable_module(__name__, "lens_halluc.generation.runner:answer")


if __name__ == "__main__":
    main()
