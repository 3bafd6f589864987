"""The lake-wide lease on object storage (Azurite): two holders never at once, a live
holder's lease is renewed past its expiry, a crashed holder's lease is taken over once
expired, and the same `exclusive` serves local and remote lakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from c360ml.storage.lease import ObjectLease, exclusive
from c360ml.storage.objects import ObjectChangedError, open_store

HOLD = """
import sys, time
from pathlib import Path
from c360ml.storage.lease import exclusive
with exclusive(sys.argv[1], "refresh", 0, ttl_seconds=float(sys.argv[3])):
    Path(sys.argv[2]).write_text("held")
    time.sleep(600)
"""


def _lease(az_root, what, ttl=30.0) -> ObjectLease:
    return ObjectLease(open_store(az_root), what, ttl)


def test_two_holders_never_at_once(az_root, caplog):
    first = _lease(az_root, "refresh")
    with first.held(0):
        second = _lease(az_root, "build gold")
        with pytest.raises(
            RuntimeError, match=r"in use by refresh \(process \d+ on .*, since"
        ) as e:
            second.acquire(0.6)
        assert str(e.value).startswith(f"the lake at {az_root} is in use by refresh")
        assert "build gold did not start" in str(e.value)
    # released: the next holder goes ahead at once, without waiting for the expiry, and
    # without saying it took over an expired lease (nobody's lease expired)
    caplog.clear()
    with _lease(az_root, "build gold").held(0):
        pass
    assert "took over" not in caplog.text


def test_a_live_holder_renews_its_lease_past_the_expiry(az_root):
    store = open_store(az_root)
    holder = _lease(az_root, "refresh", ttl=1.5)
    with holder.held(0):
        expires = json.loads(store.read_bytes("_lease"))["expires"]
        time.sleep(3.5)  # more than twice the ttl: renewed, else the lease would be free
        assert json.loads(store.read_bytes("_lease"))["expires"] > expires + 1
        with pytest.raises(RuntimeError, match="in use by refresh"):
            _lease(az_root, "build").acquire(0)
    assert holder.lost is None


def test_a_crashed_holders_lease_is_taken_over_after_its_expiry(az_root, tmp_path):
    marker = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, az_root, str(marker), "2"], env=os.environ)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.05)
        refused = pytest.raises(RuntimeError, match=rf"in use by refresh \(process {proc.pid} on")
        with refused, exclusive(az_root, "build", 0):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no release, no more renewals
        proc.wait()
    started = time.monotonic()
    with exclusive(az_root, "build", 30):
        waited = time.monotonic() - started
        info = json.loads(open_store(az_root).read_bytes("_lease"))
        assert info["what"] == "build" and info["pid"] == os.getpid()
        # nested calls of one process (a refresh running its builds) do not wait on themselves
        with exclusive(az_root, "build silver", 0):
            pass
    assert waited < 10  # the expiry (2 s after the last renewal), not the 30 s wait


def test_a_stalled_holder_cannot_renew_nor_release_a_lease_taken_over(az_root):
    """A holder whose renewals stopped (a process paused past its ttl) cannot write the
    lease once another took it over: its renewal fails (the job is told it lost the lease)
    and its release leaves the new holder's lease as it is."""
    store = open_store(az_root)
    stalled = _lease(az_root, "refresh", ttl=1.0)
    stalled.acquire(0)  # acquired without the renewal thread: as if the process froze
    time.sleep(1.2)
    taker = _lease(az_root, "build", ttl=30)
    taker.acquire(0)
    with pytest.raises(ObjectChangedError, match=rf"{az_root}/_lease was changed by another"):
        stalled.renew()
    stalled.release()
    assert json.loads(store.read_bytes("_lease"))["holder"] == taker.holder
    with pytest.raises(RuntimeError, match="in use by build"):
        _lease(az_root, "refresh").acquire(0)
