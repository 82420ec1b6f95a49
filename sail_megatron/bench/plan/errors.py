"""The error of `sail-bench plan` for a bad flag or recipe."""


class PlanError(Exception):
    """A bad flag or recipe: (flag, message); the command exits with code 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
