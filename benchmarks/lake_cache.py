"""Where the benchmarks keep the generated lake of each size.

The folder is keyed by the generator's lake version (benchmarks/cache/<size>-v<version>), so
a lake cached by an older generator (other names, other draws) is never measured by code
whose generator makes a different one. A comparison's child may run older code without a
version: that code's lakes are version 1.

A lake of another generator profile than the default (`run.py --profile sparse`, passed
to the stages' child processes as BENCH_PROFILE) has its own folder,
<size>-v<version>-<profile>; the default's keeps the name it had before profiles, so
caches made then are still found.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"
DEFAULT_PROFILE = "default"


def bench_profile() -> str:
    """The generator profile the benchmarks of this process measure (BENCH_PROFILE)."""
    return os.environ.get("BENCH_PROFILE") or DEFAULT_PROFILE


def profiled(name: str, profile: str | None = None) -> str:
    """The results file name `name` for `profile` (None: bench_profile()): the default's
    unchanged, another's with `_<profile>` after it."""
    profile = profile or bench_profile()
    return name if profile == DEFAULT_PROFILE else f"{name}_{profile}"


def size_dir(size: int, profile: str | None = None) -> Path:
    """The cache folder of `size` customers of `profile` (None: bench_profile()) for the
    generator of the code imported here."""
    import c360ml.synth

    profile = profile or bench_profile()
    suffix = "" if profile == DEFAULT_PROFILE else f"-{profile}"
    return CACHE / f"{size}-v{getattr(c360ml.synth, 'LAKE_VERSION', 1)}{suffix}"
