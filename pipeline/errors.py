"""Errors the pipeline reports to the user as one line, with what to do instead."""


class InputError(ValueError):
    """The input or output location cannot be used as given."""
