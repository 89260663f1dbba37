"""The one channel for user errors.

A user error is something the person running edgekit can fix (a wrong path, a column that is not in the
file, an output folder that already holds something). It carries one sentence naming the problem and the fix,
is caught once in the CLI and becomes exit code 2 without a traceback. Bugs are not user errors: they keep
their traceback (shown with ``--debug``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # an accuracy gate or an export tolerance was missed
EXIT_USAGE = 2  # bad input, or an interrupted run (nothing complete-looking was written)


class EdgekitError(Exception):
    """A problem the user can fix; ``str()`` is the full sentence shown to them."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        self.message = message.rstrip(".")
        self.hint = hint.rstrip(".") if hint else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}." if self.hint else f"{self.message}."


class CheckFailed(EdgekitError):
    """A measured check (export tolerance) was missed: exit 1, like a failed gate."""

    exit_code = EXIT_CHECK_FAILED


class MissingExtra(EdgekitError):
    """An optional world (gpu, tensorrt, jetson, demo) is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"this needs the Python package '{module}', which is not installed",
            f"install it with: pip install 'edgekit-transformers[{extra}]'",  # the distribution's name
        )
