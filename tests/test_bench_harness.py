"""The benchmark harness's bookkeeping (benchmarks/run.py, lake_cache.py): where a lake of
another generator profile is cached and where its figures go, apart from the default's,
whose names existing caches and comparisons rely on; and the README table over old and
new result files. No stage is run here."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

import c360ml.synth

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(monkeypatch):
    """run.py and lake_cache.py as modules, with no profile or rules set in the shell."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("BENCH_PROFILE", "BENCH_UNIFY_RULES", "BENCH_BASELINE"):
        # set first so that the undo removes what run.main() sets in os.environ itself
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return importlib.import_module("run"), importlib.import_module("lake_cache")


def test_default_cache_folder_and_results_names_unchanged(harness):
    run, lake_cache = harness
    assert lake_cache.size_dir(5000) == lake_cache.CACHE / f"5000-v{c360ml.synth.LAKE_VERSION}"
    assert run.results_name("train") == "train"
    assert run.results_name("generate") == "generate"
    assert (
        run.results_name("unify", rules="benchmarks/unify_without_common.yaml")
        == "unify_without_common"
    )


def test_sparse_profile_has_its_own_cache_folder_and_results(harness, monkeypatch):
    run, lake_cache = harness
    default = lake_cache.size_dir(5000)
    sparse = lake_cache.size_dir(5000, "sparse")
    assert sparse != default
    assert sparse.name == f"{default.name}-sparse"
    assert run.results_name("train", profile="sparse") == "train_sparse"
    monkeypatch.setenv("BENCH_PROFILE", "sparse")  # what run.py --profile sparse sets
    assert lake_cache.size_dir(5000) == sparse
    assert lake_cache.size_dir(5000, "default") == default
    assert run.results_name("generate") == "generate_sparse"
    assert run.results_name("train", profile="default") == "train"


def test_unknown_profile_and_shared_files_refused(harness, monkeypatch, capsys):
    run, _ = harness
    monkeypatch.setattr(sys, "argv", ["run.py", "--stage", "train", "--profile", "dense"])
    with pytest.raises(SystemExit, match="--profile: unknown profile 'dense': expected one of"):
        run.main()
    monkeypatch.setattr(
        sys, "argv", ["run.py", "--stage", "medallion", "--engine", "spark", "--profile", "sparse"]
    )
    with pytest.raises(SystemExit, match="--profile sparse: not with --engine spark"):
        run.main()


def _train_doc(run: dict) -> dict:
    runs = [{"train_s": 1.0, "roc_auc": 0.9, "steps_s": {"fit": 1.0}, **run}]
    result = {"size": 5000, "wall_s_median": 2.0, "peak_rss_mb_max": 3.0, "runs": runs}
    return {"date": "2026-12-08", "command": "benchmarks/run.py", "results": [result]}


def test_readme_shows_sparse_headroom_and_reads_older_train_files(harness, tmp_path, monkeypatch):
    run, _ = harness
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    # written before the headroom was recorded: no such keys
    (tmp_path / "train.json").write_text(json.dumps(_train_doc({"rfm_roc_auc": 0.86})))
    new = {
        "headroom_closed": 0.6312,
        "headroom_closed_ci": [0.5871, 0.6744],
        "roc_auc_minus_rfm": 0.0543,
        "roc_auc_minus_rfm_ci": [0.0501, 0.0588],
    }
    (tmp_path / "train_sparse.json").write_text(json.dumps(_train_doc(new)))
    run.write_readme()
    rows = (tmp_path / "README.md").read_text().splitlines()
    old = next(r for r in rows if r.startswith("| train | 5,000 |"))
    sparse = next(r for r in rows if r.startswith("| train_sparse | 5,000 |"))
    assert "1 run(s), medians:" in old and "headroom" not in old
    assert (
        "| headroom closed 0.6312 [0.5871, 0.6744]; model − RFM ROC AUC 0.0543 [0.0501, 0.0588]"
        " (95% CI); 1 run(s)" in sparse
    )
