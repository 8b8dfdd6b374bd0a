"""The exception family of mlbench.

Every error mlbench raises subclasses both :class:`MlbenchError` (so callers can catch
"anything mlbench refused") and the built-in family that fits (so ``except ValueError``
keeps working). Messages say what is wrong, what was expected and the fix, with the
real values.
"""

from __future__ import annotations


class MlbenchError(Exception):
    """Base class of every error mlbench raises on purpose."""


class ImageError(MlbenchError, ValueError):
    """An image file or array that cannot be read or used as it is."""


class ModelError(MlbenchError, ValueError):
    """An unknown model name, a bad size, or a model that cannot run this input."""


class WeightsError(MlbenchError, ValueError):
    """A weights file that is missing, damaged, or does not fit the model."""


class OptionsError(MlbenchError, ValueError):
    """A pipeline option or argument outside its allowed values."""


class StageError(MlbenchError, RuntimeError):
    """A pipeline stage failed; ``stage`` names it and ``__cause__`` holds the original."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class DataError(MlbenchError, ValueError):
    """A sample name that does not exist or bundled data that fails its checksum."""


class MlbenchWarning(UserWarning):
    """Something mlbench did on the user's behalf and says so (a model switched to eval mode)."""
