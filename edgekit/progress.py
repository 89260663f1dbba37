"""Progress reporting that the library calls and the CLI renders (rich); silent for API users."""

from __future__ import annotations

import contextlib


class Progress:
    """Null progress. Stages call ``step(description, total)`` as a context manager and ``advance()`` or
    ``update(completed=..., description=...)`` on what it yields, or call the object itself as
    ``progress(description, completed, total)``."""

    @contextlib.contextmanager
    def step(self, description: str, total: float | None = None):
        yield _NullStep()

    def __call__(self, description: str, completed: float, total: float | None) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class _NullStep:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: float | None = None, description: str | None = None) -> None:
        """Set how much of the step is done and/or what it is doing now (e.g. which variant runs)."""


class RichProgress(Progress):
    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

        import rich.progress

        self.console = console
        self._bar = rich.progress.Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self._keyed: dict[str, int] = {}

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description, total=None):
        tid = self._bar.add_task(description, total=total)
        bar = self._bar

        class _Step:
            def advance(self, n=1):
                bar.advance(tid, n)

            def update(self, completed=None, description=None):
                bar.update(tid, completed=completed, description=description)

        try:
            yield _Step()
            if total is None:
                bar.update(tid, total=1, completed=1)
            else:
                bar.update(tid, completed=total)
        finally:
            bar.stop_task(tid)

    def __call__(self, description, completed, total):
        if description not in self._keyed:
            self._keyed[description] = self._bar.add_task(description, total=total)
        self._bar.update(self._keyed[description], completed=completed, total=total)

    def log(self, message):
        self.console.log(message)
