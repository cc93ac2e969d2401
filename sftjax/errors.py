"""User-facing errors.

Every error a user can cause (a bad file, row, key or checkpoint) is raised as an :class:`SftjaxError` whose
message is one line naming the file/row/key and what is wrong. The CLI prints it without a traceback (set
``SFTJAX_DEBUG=1`` for one); the Python API simply raises it.
"""


class SftjaxError(Exception):
    """Base class of errors caused by user input; the message is one complete line."""


class ConfigError(SftjaxError):
    """A configuration key has a bad value, or an unknown key was given."""


class DataError(SftjaxError):
    """A dataset file, row or template could not be used."""


class CheckpointError(SftjaxError):
    """A model checkpoint or training checkpoint is missing, corrupt or incompatible."""
