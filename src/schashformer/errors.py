"""Exceptions raised at the package boundary.

Every rejected input raises a subclass of :class:`SCHashFormerError` with a one-line
message naming the file, field or value at fault. The command line prints that line
and exits with status 2 instead of showing a traceback.
"""


class SCHashFormerError(Exception):
    """Base class for all errors scHashFormer raises on purpose."""


class InputError(SCHashFormerError, ValueError):
    """The input data (file, matrix, key) cannot be used as given."""


class ParameterError(SCHashFormerError, ValueError):
    """A parameter is outside its valid range."""


class OutputExistsError(SCHashFormerError, FileExistsError):
    """An output location already holds results and overwrite was not requested."""


class OutputError(SCHashFormerError, OSError):
    """Results could not be written (disk full, permission denied, ...); nothing partial is left behind."""


class TrainingError(SCHashFormerError, RuntimeError):
    """Training diverged (e.g. a NaN loss)."""


class ResourceError(SCHashFormerError, MemoryError):
    """The input would not fit in the memory available; the message says how much is needed."""
