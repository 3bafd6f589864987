"""`c360ml` as a user runs it, in a process that SIGKILLs itself (its process group) at one
named Delta commit, or that records every commit it makes, in order.

Why in the process: on object storage a watcher outside (tests/crash.py polls the local
`_delta_log` files) sees a commit only by listing the container, too late to stop a run
between a data file's upload and the log entry that publishes it, which is where a kill
leaves blobs no version references. Here only the two commit paths of
`c360ml.storage.lake` are wrapped (c360ml's own `_commit_json`, and `Lake.write`, which
commits through delta-rs); the container, delta-rs and the commits themselves are real.

Usage: `python kill_at_commit.py PLAN c360ml-arguments...`, PLAN a JSON file:
`{"record": "<file>"}` appends one JSON line per commit (`key` of its log entry, `by`
c360ml or delta-rs, `operation`, `deletion_vectors`, `new_files`), or
`{"kill": "<key>", "when": "before" | "after"}` kills at that commit: before its log entry
is put (its data files uploaded), or once it is.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path


def _describe(key: str, actions: list[dict]) -> dict:
    """What a c360ml commit is: its operation, whether it writes deletion vectors, and how
    many data files it adds that did not exist before (an add without a vector)."""
    adds = [a["add"] for a in actions if "add" in a]
    info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
    return {
        "key": key,
        "by": "c360ml",
        "operation": info.get("operation", ""),
        "deletion_vectors": any(a.get("deletionVector") for a in adds),
        "new_files": sum(1 for a in adds if not a.get("deletionVector")),
    }


def install(plan: dict) -> None:
    """Wrap the lake's commit paths with the plan's recorder or kill switch."""
    from c360ml.storage import lake

    lock = threading.Lock()  # gold commits from several threads at once

    def event(note: dict, when: str) -> None:
        if "record" in plan and when == "after":
            with lock, open(plan["record"], "a") as out:
                out.write(json.dumps(note) + "\n")
        if plan.get("kill") == note["key"] and plan.get("when") == when:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    commit_json, write = lake._commit_json, lake.Lake.write

    def committing(root, version: int, actions: list[dict]) -> None:  # noqa: ANN001
        note = _describe(lake._as_where(root).log(f"{version:020d}.json"), actions)
        event(note, "before")
        commit_json(root, version, actions)
        event(note, "after")

    def writing(self, data, layer: str, *parts: str, **kwargs) -> int:  # noqa: ANN001
        version = write(self, data, layer, *parts, **kwargs)
        key = f"{self.key(layer, *parts)}/_delta_log/{version:020d}.json"
        event({"key": key, "by": "delta-rs", "operation": "WRITE"}, "after")
        return version

    lake._commit_json = committing
    lake.Lake.write = writing


if __name__ == "__main__":
    install(json.loads(Path(sys.argv[1]).read_text()))
    from c360ml.cli import main

    sys.exit(main(sys.argv[2:]))
