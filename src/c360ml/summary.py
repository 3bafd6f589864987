"""What a stage reports when it is done: one record per table or step, in order.

Every long command ends with its stage's summary, printed as a table by the CLI; the
benchmarks and the tests read the records. One shape, learnt once: a summary holds a
list of records (dataclasses, or plain dicts), and `rows()` is what the table shows:
each record's fields (times rounded to hundredths), or the record's own `row()` where
the printed names differ from the field names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Generic, TypeVar

R = TypeVar("R")


def _row(record: Any) -> dict:
    if hasattr(record, "row"):
        return record.row()
    row = asdict(record) if is_dataclass(record) else dict(record)
    return {
        k: round(v, 2) if isinstance(v, float) and k == "seconds" else v for k, v in row.items()
    }


@dataclass(kw_only=True)
class Summary(Generic[R]):
    """A stage's records in the order they happened (or are declared)."""

    items: list[R] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return [_row(r) for r in self.items]
