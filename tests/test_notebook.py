"""examples/retention_notebook.ipynb runs from a fresh lake to a registered challenger.

Executed cell by cell in a real Jupyter kernel (nbclient), so the example a data scientist
copies never rots; the asserts read its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "retention_notebook.ipynb"


def _text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/plain", "") if isinstance(data, dict) else "")
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


@pytest.mark.slow
def test_the_notebook_runs_and_registers_a_challenger_through_the_gate(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.setenv("RETENTION_NOTEBOOK_HOME", str(home))
    monkeypatch.setenv("RETENTION_NOTEBOOK_CUSTOMERS", "1500")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in cells)
    assert "Evaluation(HistGradientBoostingClassifier: grade" in text
    register = next(c for c in cells if "project.register(challenger)" in c.source)
    out = _text(register)
    assert "version 2:" in out and "grade:" in out
    assert "comparison with the champion" in out, out
    assert "feature 'purchases_next_90d' leaks" in text
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3
    assert "no per-customer contributions" in text
    versions = json.dumps([_text(c) for c in cells if "project.versions()" in c.source])
    assert "HistGradientBoostingClassifier" in versions
