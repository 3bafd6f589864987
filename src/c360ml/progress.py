"""Progress of long work, reported to whoever shows it.

The library never prints: a long loop reports through `track`, and the command line
installs a listener that draws progress bars. Without a listener (a notebook, a worker
process, the tests) tracking costs nothing and shows nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[[], None]
# (description, total) -> (advance by one, close)
Listener = Callable[[str, int | None], tuple[Advance, Callable[[], None]]]

_listener: Listener | None = None


def listen(listener: Listener | None) -> None:
    """Install (or, with None, remove) the one listener of this process."""
    global _listener
    _listener = listener


@contextmanager
def track(description: str, total: int | None = None) -> Iterator[Advance]:
    """A unit of long work with `total` steps; call the yielded function after each."""
    if _listener is None:
        yield lambda: None
        return
    advance, close = _listener(description, total)
    try:
        yield advance
    finally:
        close()
