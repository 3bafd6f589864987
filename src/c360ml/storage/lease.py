"""One writer per lake: a build, refresh or generate that finds another one at work on the
same lake waits for it, then stops with a message that names it.

Two refreshes interleaving their commits would leave tables, quarantine and state from
different runs side by side. The lease is an exclusive `flock` on `<lake>/_lease` (local
disk; the lock goes with the process, so a killed run leaves none behind), held by the
outermost call of a process: a refresh that runs ingest and the builds holds it once.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

LEASE_FILE = "_lease"
POLL_SECONDS = 0.5

_held: dict[Path, int] = {}  # lake root -> depth of calls holding its lease in this process
_guard = threading.RLock()


@contextmanager
def exclusive(root: Path, what: str, wait_seconds: float) -> Iterator[None]:
    """Hold the lake's lease for `what`, waiting up to `wait_seconds` for another holder."""
    root = Path(root).resolve()
    with _guard:
        nested = _held.get(root, 0) > 0
        if nested:
            _held[root] += 1
    if nested:  # this process holds it already (a refresh running its builds)
        try:
            yield
        finally:
            with _guard:
                _held[root] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / LEASE_FILE
    with open(path, "a+") as handle:
        _acquire(handle, path, what, wait_seconds)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "what": what, "since": since}))
        handle.flush()
        with _guard:
            _held[root] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(root, None)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle: Any, path: Path, what: str, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    told = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the lake at {path.parent} is in use by {holder}; {what} did not start "
                    f"(waited {wait_seconds:.0f} s; run it again once that one is done)"
                ) from None
            if not told:
                log.warning("%s waits for the lake at %s: in use by %s", what, path.parent, holder)
                told = True
            time.sleep(POLL_SECONDS)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"{info['what']} (process {info['pid']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


F = TypeVar("F", bound=Callable[..., Any])


def writes_lake(what: str) -> Callable[[F], F]:
    """Run the decorated `fn(settings, ...)` under the lease of `settings.lake`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(settings: Any, *args: Any, **kwargs: Any) -> Any:
            with exclusive(settings.lake, what, settings.lease_wait_seconds):
                return fn(settings, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
