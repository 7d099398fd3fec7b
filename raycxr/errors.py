"""Exceptions raised by raycxr. Each message says what the user can do next."""


class RaycxrError(Exception):
    """Base class for every error raycxr raises on purpose."""


class ConfigError(RaycxrError):
    """A search space, CLI option or config file is invalid. Lists every problem found."""

    def __init__(self, problems: list[str] | str, *, source: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid:\n{lines}")


class DataError(RaycxrError):
    """Input data is missing, unreadable, or does not match the schema."""


class DecodeError(DataError):
    """One image file could not be decoded; ingest quarantines it, predict reports it."""


class NoEligibleTrialError(RaycxrError):
    """A search finished without any trial that reported a validation metric."""


class ExportError(RaycxrError):
    """An exported graph (TorchScript, ONNX) does not reproduce the eager model."""
