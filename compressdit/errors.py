"""Errors a user can act on; the CLI prints them as one line and exits non-zero."""


class CompressditError(Exception):
    """Base class of every error the CLI reports as a one-line message."""


class ConfigError(CompressditError):
    """A recipe or config is invalid (unknown key, value out of range, wrong type)."""


class CheckpointError(CompressditError):
    """A checkpoint is missing, corrupt, truncated or inconsistent with its config."""


class UnsupportedModelError(CompressditError):
    """The model's class has no adapter."""


class CalibrationError(CompressditError):
    """Calibration produced non-finite statistics or had no data."""


class ModelNotFoundError(CompressditError):
    """A MODEL argument names nothing that can be loaded here."""


class TrainingIncomplete(CompressditError):
    """Training stopped at its time cap with its state saved; rerunning the same command resumes it."""
