"""Two versions of the code on the same lake, interleaved: the refresh or training of one
git revision (the baseline, `BENCH_BASELINE=<rev>`) against the code under test.

    BENCH_BASELINE=<rev> make bench STAGE=refresh SIZES=100000      # or STAGE=train

Why interleaved: this machine's speed swings by tens of percent within an hour, so a
comparison of runs made at different times measures the load as much as the code. Runs
alternate baseline, new, baseline, new, ... (`repeats` of each, at least 3), and the
medians and their ratio are written to results/<stage>_compare.json.

The code under test is the working tree as this benchmark starts (src/, pipelines/ and
features/ copied under the work folder), or `BENCH_CODE=<rev>`; the baseline is
`git archive` of BENCH_BASELINE. Each run is a fresh process with that copy first on its
PYTHONPATH and its settings' root there (its SQL and specs), so a shared working tree being
edited meanwhile does not change what is measured.

The lake: the stages' cached ML lake of that size (benchmarks/cache/<size>/ml, generated and
built through gold first if missing) with a champion (trained once by the code under test
if it has none). A refresh run gets its own copy of lake, truth and MLflow store (the lake
hard-linked: Delta files are never rewritten in place; the lease file, the truth and the
MLflow database copied), then does what the refresh stage does: one weekly increment,
then the whole refresh. A training run reads the same lake and registers into an MLflow
store of its own (so each is a first model, gated alike).

Memory: besides each process's own peak RSS (the refresh's parent, and its largest
worker), the peak of the sum over the run's process tree, sampled every 0.2 s from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from lake_cache import size_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
CODE_PARTS = ("src", "pipelines", "features")
# The figures each stage is compared by (besides wall time and memory).
FIGURES = {
    "refresh": ("refresh_s",),
    "train": ("train_s", "roc_auc", "rfm_roc_auc", "sample_rate", "test_sample_rate"),
}


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip()


def snapshot_code(work: Path) -> dict[str, dict]:
    """The two codes as folders of their own: {label: {path, description}}."""
    codes = {}
    baseline = os.environ["BENCH_BASELINE"]
    for label, rev in (("baseline", baseline), ("new", os.environ.get("BENCH_CODE", ""))):
        folder = work / f"code-{label}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if rev:
            sha = _git("rev-parse", f"{rev}^{{commit}}")
            archive = subprocess.run(
                ["git", "archive", sha, *CODE_PARTS], cwd=ROOT, check=True, stdout=subprocess.PIPE
            )
            subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
            codes[label] = {"path": folder, "code": f"{rev} ({sha[:10]})"}
        else:
            for part in CODE_PARTS:
                shutil.copytree(
                    ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__")
                )
            changed = _git("status", "--porcelain", "--", *CODE_PARTS).splitlines()
            codes[label] = {
                "path": folder,
                "code": f"working tree on {_git('rev-parse', '--short=10', 'HEAD')}",
                "uncommitted": changed,
            }
    return codes


def _child_env(code: Path, ml_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code / "src")
    env["BENCH_ROOT"] = str(code)
    env["BENCH_ML_DIR"] = str(ml_dir)
    return env


def _tree_rss_kb(pid: int) -> int:
    """RSS of a process and every descendant (kB), from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        parents[int(entry)] = int(fields.get("PPid", "0").strip() or 0)
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def run_child(args: list[str], env: dict[str, str]) -> dict:
    """One `run.py --one` child; its RESULT figures plus the peak RSS of its process tree."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "run.py"), *args], env=env, stdout=subprocess.PIPE, text=True
    )
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed (exit {proc.returncode})")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["tree_peak_rss_mb"] = round(peak[0] / 1024, 1)
    return result


def base_state(size: int, codes: dict) -> Path:
    """benchmarks/cache/<size>/ml built through gold, with a champion in its MLflow store."""
    base = size_dir(size) / "ml"
    if not (size_dir(size) / "lake" / "landing").exists():
        subprocess.run([sys.executable, str(HERE / "run.py"), "--stage", "generate", "--sizes",
                        str(size)], check=True)  # fmt: skip
    new = codes["new"]["path"]
    if not (base / "lake" / "gold" / "orders").exists():
        env = _child_env(new, base)
        subprocess.run(
            [sys.executable, str(HERE / "run.py"), "--build-ml", str(size)], env=env, check=True
        )
    if not _has_champion(base, new):
        print(f"training a champion at {size} (code under test)", file=sys.stderr)
        run_child(["--one", "train", str(size)], _child_env(new, base))
    return base


def _has_champion(base: Path, code: Path) -> bool:
    probe = (
        "import sys, mlflow\n"
        "from c360ml.config import Settings\n"
        "c = mlflow.MlflowClient(sys.argv[1], sys.argv[1])\n"
        "try:\n    c.get_model_version_by_alias(Settings().model_name, 'champion')\n"
        "except Exception:\n    sys.exit(1)\n"
    )
    db = base / "mlflow" / "mlflow.db"
    if not db.exists():
        return False
    uri = f"sqlite:///{db}"
    env = dict(os.environ, PYTHONPATH=str(code / "src"))
    return subprocess.run([sys.executable, "-c", probe, uri], env=env).returncode == 0


def run_dir(base: Path, work: Path, stage: str) -> Path:
    """A run's own lake, truth and MLflow store (see the module docstring)."""
    target = work / "run"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if stage == "refresh":
        subprocess.run(["cp", "-al", str(base / "lake"), str(target / "lake")], check=True)
        lease = target / "lake" / "_lease"
        if lease.exists():
            lease.unlink()
            lease.touch()
        shutil.copytree(base / "truth", target / "truth")
        shutil.copytree(base / "mlflow", target / "mlflow")
    else:
        (target / "lake").symlink_to(base / "lake")
        (target / "truth").symlink_to(base / "truth")
        (target / "mlflow").mkdir()
    return target


def compare(stage: str, size: int, repeats: int) -> dict:
    work = size_dir(size) / "compare"
    work.mkdir(parents=True, exist_ok=True)
    codes = snapshot_code(work)
    base = base_state(size, codes)
    runs = []
    for i in range(repeats):
        for label in ("baseline", "new") if i % 2 == 0 else ("new", "baseline"):
            target = run_dir(base, work, stage)
            load = os.getloadavg()[0]
            print(
                f"{stage} {size}: run {i + 1}/{repeats}, {label} (load {load:.2f})", file=sys.stderr
            )
            result = run_child(
                ["--one", stage, str(size)], _child_env(codes[label]["path"], target)
            )
            result.update(code=label, repeat=i + 1, load_1min_before=round(load, 2))
            runs.append(result)
            print(json.dumps({k: result.get(k) for k in ("code", "wall_s", *FIGURES[stage],
                              "peak_rss_mb", "child_peak_rss_mb", "tree_peak_rss_mb")}),
                  file=sys.stderr)  # fmt: skip
    shutil.rmtree(work / "run", ignore_errors=True)
    summary = {}
    for label in ("baseline", "new"):
        mine = [r for r in runs if r["code"] == label]
        medians = {
            k: statistics.median(r[k] for r in mine)
            for k in (
                "wall_s",
                *FIGURES[stage],
                "peak_rss_mb",
                "child_peak_rss_mb",
                "tree_peak_rss_mb",
            )  # fmt: skip
            if all(isinstance(r.get(k), (int, float)) for r in mine)
        }
        steps = {}
        for r in mine:
            for k in r.get("steps_s", {}):
                steps[k] = statistics.median(x["steps_s"][k] for x in mine if k in x["steps_s"])
        summary[label] = {
            "code": codes[label]["code"],
            **(
                {"uncommitted": codes[label]["uncommitted"]}
                if "uncommitted" in codes[label]
                else {}
            ),
            "medians": medians,
            "steps_s_medians": steps,
            "max_tree_peak_rss_mb": max(r["tree_peak_rss_mb"] for r in mine),
        }
    key = FIGURES[stage][0]
    ratio = summary["new"]["medians"][key] / summary["baseline"]["medians"][key]
    return {
        "size": size,
        "stage": stage,
        "repeats": repeats,
        "order": [f"{r['code']}" for r in runs],
        f"{key}_ratio_new_to_baseline": round(ratio, 3),
        **summary,
        "runs": runs,
    }


def main(stage: str, sizes: list[int], repeats: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stage}_compare.json"
    results = []
    for size in sizes:
        result = compare(stage, size, max(repeats, 3))
        code = " ".join(
            f"{k}={os.environ[k]}" for k in ("BENCH_BASELINE", "BENCH_CODE") if k in os.environ
        )
        result.update(date=time.strftime("%Y-%m-%d"), command=f"{code} {' '.join(sys.argv)}")
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    ran = {r["size"] for r in results}
    kept = []
    if path.exists():
        kept = [r for r in json.loads(path.read_text()).get("results", []) if r["size"] not in ran]
    path.write_text(
        json.dumps({"results": sorted(kept + results, key=lambda r: r["size"])}, indent=1) + "\n"
    )
