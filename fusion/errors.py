"""Exceptions users can cause. Each message says what went wrong and what to do.

Everything raised on purpose by labelfuse derives from :class:`LabelfuseError`, so
callers (the CLI, the HTTP layer) can turn it into a clean message or a 4xx.
"""


class LabelfuseError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class ConfigError(LabelfuseError):
    """A configuration value is missing, malformed or not allowed."""


class DataError(LabelfuseError):
    """Input data is missing, unreadable, or does not match the expected columns/labels."""


class EncoderError(LabelfuseError):
    """The text encoder could not be located or loaded."""


class BundleError(LabelfuseError):
    """A saved model bundle is missing files, corrupted, or from an incompatible version."""


class NotFittedError(LabelfuseError, AttributeError):
    """A classifier was used before ``fit`` or ``load`` (an AttributeError too, as scikit-learn expects)."""
