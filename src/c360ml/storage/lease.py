"""One writer per lake: a build, refresh or generate that finds another one at work on the
same lake waits for it, then stops with a message that names it.

Two refreshes interleaving their commits would leave tables, quarantine and state from
different runs side by side. The lease is held by the outermost call of a process: a
refresh that runs ingest and the builds holds it once. On a local disk it is an exclusive
`flock` on `<lake>/_lease` (the lock goes with the process, so a killed run leaves none
behind). On object storage, where no lock dies with its process, it is the object
`<lake>/_lease` with an expiry: created only if absent, renewed by a thread while the job
runs, taken over (by a conditional write on the version read, so by one waiter only) once
expired or released; a crashed job's lease expires `ttl_seconds` after its last renewal.
Expiry is judged by the clocks of the machines involved, which must agree to well within
a `ttl_seconds`.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from c360ml.storage.location import LakeLocation, parse_location
from c360ml.storage.objects import AzureLakeStore, ObjectChangedError, open_store

log = logging.getLogger(__name__)

LEASE_FILE = "_lease"
POLL_SECONDS = 0.5
TTL_SECONDS = 60.0  # an object lease's life without renewal (a crashed job's, at most)

_held: dict[str, int] = {}  # lake root -> depth of calls holding its lease in this process
_guard = threading.RLock()


@contextmanager
def exclusive(
    root: Path | str | LakeLocation,
    what: str,
    wait_seconds: float,
    ttl_seconds: float = TTL_SECONDS,
) -> Iterator[None]:
    """Hold the lake's lease for `what`, waiting up to `wait_seconds` for another holder.
    `root` is a local folder or an object-storage URI; `ttl_seconds` applies to the latter
    (renewed every third of it)."""
    location = parse_location(root)
    name = location.uri()
    with _guard:
        nested = _held.get(name, 0) > 0
        if nested:
            _held[name] += 1
    if nested:  # this process holds it already (a refresh running its builds)
        try:
            yield
        finally:
            with _guard:
                _held[name] -= 1
        return
    if location.remote:
        with ObjectLease(open_store(location), what, ttl_seconds).held(wait_seconds):
            with _guard:
                _held[name] = 1
            try:
                yield
            finally:
                with _guard:
                    _held.pop(name, None)
        return
    root = Path(location.path)
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
            _held[name] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(name, None)
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


class ObjectLease:
    """The lake's lease as an object with an expiry (see the module docstring)."""

    def __init__(self, store: Any, what: str, ttl_seconds: float, key: str = LEASE_FILE):
        if not isinstance(store, AzureLakeStore):
            raise TypeError(f"{store.uri(key)}: an object lease needs object storage")
        self.store, self.what, self.ttl, self.key = store, what, ttl_seconds, key
        self.holder = uuid.uuid4().hex
        self.identity = ""  # the version of the lease object this holder wrote last
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.lost: str | None = None  # why the renewal thread gave the lease up
        self._stop = threading.Event()

    def _body(self, expires: float) -> bytes:
        info = {
            "holder": self.holder,
            "what": self.what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": self.since,
            "expires": expires,
        }
        return json.dumps(info).encode()

    def acquire(self, wait_seconds: float) -> None:
        """Create the lease, or take over an expired or released one; wait up to
        `wait_seconds` for a live holder, then raise naming it."""
        deadline = time.monotonic() + wait_seconds
        told = False
        while True:
            body = self._body(time.time() + self.ttl)
            try:
                self.identity = self.store.create_tagged(self.key, body)
                return
            except FileExistsError:
                pass
            try:
                data, version = self.store.read_tagged(self.key)
            except FileNotFoundError:
                continue  # deleted by hand in between: create it again
            info = _info(data)
            if float(info.get("expires", 0)) < time.time():
                try:  # only one waiter's write on the version read succeeds
                    self.identity = self.store.replace(self.key, body, version)
                except ObjectChangedError:
                    continue
                if "holder" in info and float(info.get("expires", 0)) > 0:  # 0: released
                    log.warning("%s took over the expired lease of %s", self.what, _name(info))
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the lake at {self.store.uri()} is in use by {_name(info)}; {self.what} "
                    f"did not start (waited {wait_seconds:.0f} s; run it again once that one "
                    "is done, or after its lease expires)"
                )
            if not told:
                log.warning("%s waits for the lake at %s: in use by %s", self.what,
                            self.store.uri(), _name(info))  # fmt: skip
                told = True
            time.sleep(POLL_SECONDS)

    def renew(self) -> None:
        """Push the expiry on; ObjectChangedError if another holder took the lease over."""
        body = self._body(time.time() + self.ttl)
        self.identity = self.store.replace(self.key, body, self.identity)

    def release(self) -> None:
        """Mark the lease expired (a conditional write: a lease taken over is left alone)."""
        try:
            self.identity = self.store.replace(self.key, self._body(0), self.identity)
        except (ObjectChangedError, OSError) as exc:
            log.warning("%s: could not release the lease: %s", self.what, exc)

    def _renewals(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except ObjectChangedError:
                self.lost = "taken over by another holder after it expired"
                log.error("%s lost the lease on %s: %s", self.what, self.store.uri(), self.lost)
                return
            except OSError as exc:  # transient: try again before the expiry
                log.warning("%s could not renew its lease: %s", self.what, exc)

    @contextmanager
    def held(self, wait_seconds: float) -> Iterator[ObjectLease]:
        """Acquire, renew in a thread while the body runs, release. A lease lost on the way
        is an error at the end (its job's commits may interleave with another's)."""
        self.acquire(wait_seconds)
        renewer = threading.Thread(target=self._renewals, name="lease-renewal", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            self._stop.set()
            renewer.join()
            if self.lost is None:
                self.release()
        if self.lost is not None:
            raise RuntimeError(f"{self.what} lost the lease on {self.store.uri()}: {self.lost}")


def _info(data: bytes) -> dict:
    try:
        found = json.loads(data or b"{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _name(info: dict) -> str:
    try:
        return f"{info['what']} (process {info['pid']} on {info['host']}, since {info['since']})"
    except KeyError:
        return "another process"


F = TypeVar("F", bound=Callable[..., Any])


def writes_lake(what: str) -> Callable[[F], F]:
    """Run the decorated `fn(settings, ...)` under the lease of `settings.lake`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(settings: Any, *args: Any, **kwargs: Any) -> Any:
            wait, ttl = settings.lease_wait_seconds, settings.lease_ttl_seconds
            with exclusive(settings.lake, what, wait, ttl):
                return fn(settings, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
