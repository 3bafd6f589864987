"""Where the benchmarks keep the generated lake of each size.

The folder is keyed by the generator's lake version (benchmarks/cache/<size>-v<version>), so
a lake cached by an older generator (other names, other draws) is never measured by code
whose generator makes a different one. A comparison's child may run older code without a
version: that code's lakes are version 1.
"""

from __future__ import annotations

from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"


def size_dir(size: int) -> Path:
    """The cache folder of `size` customers for the generator of the code imported here."""
    import c360ml.synth

    return CACHE / f"{size}-v{getattr(c360ml.synth, 'LAKE_VERSION', 1)}"
