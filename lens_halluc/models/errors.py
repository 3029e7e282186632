"""Errors of the models layer."""


class ModelLoadError(FileNotFoundError):
    """A checkpoint that cannot be found or loaded; the message says how to fix it."""
