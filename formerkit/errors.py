"""The errors formerkit raises on bad input.

Every error is a ``ValueError`` subclass, so code that already catches ``ValueError`` keeps working, and each message
says what was expected, what was given and where (the config field, the argument, the file).
"""

from __future__ import annotations


class FormerkitError(ValueError):
    """Base class of every error formerkit raises on bad input."""


class ConfigError(FormerkitError):
    """A config field holds a value that is not allowed, or fields contradict each other."""

    def __init__(self, field: str, value: object, expected: str, *, hint: str = ""):
        self.field = field
        self.value = value
        self.expected = expected
        message = f"{field}: expected {expected}, got {value!r}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class UnknownFieldError(ConfigError):
    """A config dict names a field that does not exist."""

    def __init__(self, field: str, known: list[str], suggestion: str | None):
        self.field = field
        self.value = field
        self.known = known
        self.suggestion = suggestion
        message = f"unknown config field {field!r}"
        if suggestion:
            message += f"; did you mean {suggestion!r}"
        message += f". Known fields here: {', '.join(known)}"
        FormerkitError.__init__(self, message)


class InputError(FormerkitError):
    """A tensor passed to a model has the wrong shape, dtype or values."""


class CheckpointError(FormerkitError):
    """A saved model is missing, corrupted, truncated or does not match its config."""


class InteropError(FormerkitError):
    """A checkpoint of another library (Hugging Face ``transformers``) cannot be converted faithfully: an unknown
    model type, a config value formerkit does not reproduce, a missing or unexpected weight, or a formerkit model with
    no equivalent in that library."""


class ExportError(FormerkitError):
    """A model, or one of its parts, cannot be exported to the format asked for (ONNX, ``torch.export``)."""


class ServeError(FormerkitError):
    """A request ``formerkit serve`` refuses: an HTTP status and a message saying what is wrong; for the
    OpenAI-compatible endpoints also the request field at fault (``param``) and a machine-readable ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
