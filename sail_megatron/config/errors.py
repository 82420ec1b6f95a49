"""The one error type every config check raises."""


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")
