"""The one error family of compressor.

Library code raises a `CompressorError` (or a subclass) for anything a user can fix: a bad path, a
malformed config, a budget no architecture meets. The CLI prints its message as one line and exits
non-zero; any other exception is a bug and keeps its traceback.
"""


class CompressorError(Exception):
    """A user-fixable problem; the message says what is wrong and how to fix it."""


class ConfigError(CompressorError):
    """An invalid or unsupported model configuration."""


class CheckpointError(CompressorError):
    """A checkpoint folder that cannot be read or written as asked."""


class DataError(CompressorError):
    """Input data that cannot be read, tokenized or packed as asked."""


class BudgetError(CompressorError):
    """A budget, size, context length or hardware name that cannot be read or met."""


class OptionError(CompressorError):
    """An option with a value it cannot take. Library code names the parameter (`temperature`); the CLI
    shows it as the flag (`--temperature`)."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


class OptionClash(CompressorError):
    """A strategy declares an option whose flag a command already has (`--seq-len`): one flag cannot carry
    both, so the command refuses to run rather than lose one of them."""


def check_at_least(**values: tuple[int | float | None, int | float]) -> None:
    """Raise an OptionError for the first `name=(value, lowest allowed)` below its bound (None passes)."""
    for name, (value, low) in values.items():
        if value is not None and not value >= low:
            raise OptionError(name, f"must be at least {low}, got {value}")


def check_applies(config: object, needs: dict[str, tuple[str, bool]]) -> None:
    """Raise an OptionError for the first option of `config` changed from its default (its class's) while
    what it belongs to is off: given alone, it would do nothing. `needs` maps an option's name to what it
    applies with (as written on the command line) and whether the run has that."""
    for name, (needed, on) in needs.items():
        if not on and getattr(config, name) != getattr(type(config), name):
            raise OptionError(name, f"applies with {needed} only: add it, or leave this out")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
