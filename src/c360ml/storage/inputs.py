"""What a table was last written from: the inputs its Delta commits record.

Every derived table records, in the custom metadata of the commit that writes it, the
versions of the tables it was computed from and whatever else decides its content (an
as_of, a model version). A step whose inputs have not moved skips; a unit of work
killed between two of its commits is found incomplete, because its parts disagree.
One key and one reader, so that every stage answers "unchanged?" the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from c360ml.storage.lake import Lake

INPUTS_KEY = "c360ml.inputs"


def stamp(inputs: dict, **extra: str) -> dict[str, str]:
    """The commit metadata that records `inputs` (plus other keys, such as a digest)."""
    return {INPUTS_KEY: json.dumps(inputs), **extra}


def last_record(
    lake: Lake, where: tuple[str, ...], match: Callable[[dict], bool] = lambda _: True
) -> tuple[dict, dict[str, str]] | None:
    """(inputs, whole commit metadata) of the newest commit of `where` that recorded
    inputs for which `match` holds; None for a missing table or no such commit."""
    if not lake.exists(*where):
        return None
    for meta in reversed(lake.commit_metadata(*where)):
        if INPUTS_KEY in meta:
            inputs = json.loads(meta[INPUTS_KEY])
            if match(inputs):
                return inputs, meta
    return None


def unchanged(lake: Lake, parts: list[tuple[str, ...]], inputs: dict) -> bool:
    """Whether every part of a unit of work (a table and its quarantine, say) was last
    written from `inputs`: a build killed between their commits leaves one behind."""
    records = [last_record(lake, where) for where in parts]
    return all(r is not None and r[0] == inputs for r in records)


def versions(lake: Lake, layer: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Versions of every table of a layer ("<layer>/<path>" -> version), but `exclude`
    (names of a table's last path part): the inputs a stage reading that layer records."""
    return {
        f"{layer}/{'/'.join(p)}": lake.version(layer, *p)
        for p in lake.tables(layer)
        if p[-1] not in exclude
    }
