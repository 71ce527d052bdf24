"""Errors a user can fix. The CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations


class LorakitError(Exception):
    """A problem with the user's input (options, files, data), explained in the message."""


class ConfigError(LorakitError):
    """One or more problems with the options, all reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))

    def __str__(self) -> str:
        count = len(self.problems)
        head = "1 problem" if count == 1 else f"{count} problems"
        return f"{head} in the options:\n" + "\n".join(f"  - {p}" for p in self.problems)


class DataError(LorakitError):
    """A dataset file or folder that cannot be used; the message names it."""


class CheckpointError(LorakitError):
    """A model or LoRA file that cannot be read; the message names it."""


class TrainingStopped(LorakitError):
    """A run that cannot continue meaningfully (a NaN or infinite loss); the message names the step."""
