"""A minimal progress interface: library code reports, the CLI renders (with rich); the default does nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[..., None]  # advance(n=1, total=None, **fields): n steps done; fields (loss=0.3) are displayed


class Progress:
    """Progress sink that ignores everything; subclass and override ``task`` to display."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        """A unit of work of ``total`` steps; yields ``advance``."""
        yield lambda n=1, **fields: None

    def log(self, message: str) -> None:
        """A one-line message for the user (ignored by default)."""


NULL_PROGRESS = Progress()
