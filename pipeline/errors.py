"""Errors that end a job with a one-line message instead of a traceback."""


class InputError(ValueError):
    """The job's input or output location cannot be used as given."""


class CompileFailed(RuntimeError):
    """``--compile`` could not compile a model on a node: the run stops rather than blame images."""


class StorageUnavailable(OSError):
    """Object storage kept failing transiently for longer than segpipe retries; the run can be resumed."""
