"""One writer per lake: a second build waits for the first, then stops naming it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from c360ml.storage.lease import exclusive
from tests.conftest import make_settings

HOLD = """
import sys, time
from pathlib import Path
from c360ml.storage.lease import exclusive
with exclusive(Path(sys.argv[1]), "refresh", 0):
    Path(sys.argv[2]).write_text("held")
    time.sleep(float(sys.argv[3]))
"""


def _holder(lake: Path, marker: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lake), str(marker), str(seconds)])
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.05)
    return proc


def test_a_second_writer_is_stopped_with_the_holder_named(tmp_path):
    from c360ml.medallion.ingest import ingest_landing

    settings = make_settings(tmp_path).model_copy(update={"lease_wait_seconds": 0.5})
    proc = _holder(settings.lake, tmp_path / "held", 20)
    try:
        with pytest.raises(RuntimeError, match=rf"in use by refresh \(process {proc.pid}, since"):
            ingest_landing(settings)
        assert not (settings.lake / "bronze").exists()  # it did not start
    finally:
        proc.kill()
        proc.wait()
    # A killed holder leaves no lease behind: the next writer goes ahead at once.
    with exclusive(settings.lake, "build", 0):
        pass


def test_a_writer_waits_for_the_holder_to_finish(tmp_path):
    lake = tmp_path / "lake"
    proc = _holder(lake, tmp_path / "held", 2)
    started = time.monotonic()
    with exclusive(lake, "build", 60):
        waited = time.monotonic() - started
    proc.wait()
    assert waited > 1.0  # the holder kept the lake 2 s after it took it
    # Nested calls of one process (a refresh running the builds) do not wait on themselves.
    with exclusive(lake, "refresh", 0), exclusive(lake, "build silver", 0):
        pass
