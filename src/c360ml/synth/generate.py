"""Generate the synthetic landing zone and its truth; append later syncs (increments).

Why the whole future is simulated up front: the behavioural process must continue
deterministically across increments, so the first run simulates `future_days` beyond
`end` and parks the rows that are not yet due in `truth/_pending/`. Increment k then
publishes the rows whose sink time falls in the next `increment_days`, as the next
Synapse Link sync would, plus the deletes of the persons erased by privacy requests.

Cut-offs: the initial sync holds every change row with SinkModifiedOn before midnight
after `end` (a few rows modified late on the last day reach the sink after midnight and
arrive with increment 1, like late rows do); its folder is stamped one hour later.
Increment k covers [cut_{k-1}, cut_k), cut_k = cut_0 + k * 7 days, stamped cut_k + 1 h.
Truth purchases and cases are cut by their event time at the same instants.

The generic path (`landing/generic/transactions.csv`, with header) is a full snapshot
written by the initial run only: one row per line of every non-cancelled order and return
of the Commerce persons, keyed by a generic customer id `G` + 8 digits (in person_keys).
In `fmt="delta"` the Synapse CSV folders are not written; malformed rows and duplicates
exist only in CSV (a typed Delta table cannot hold them).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from c360ml.config import Settings
from c360ml.sources.tables import D365_TABLES, DATAVERSE_TABLES
from c360ml.storage.lake import LAYERS, Lake
from c360ml.storage.lease import writes_lake
from c360ml.storage.location import parse_location
from c360ml.storage.objects import upload_folder
from c360ml.summary import Summary
from c360ml.synth import process, records
from c360ml.synth import shock as shock_mod
from c360ml.synth.params import (
    RECID_BASE,
    GeneratorConfig,
    LakeShape,
    channel_mapping,
    process_profile,
)
from c360ml.synth.writer import (
    SYNC_TS_FORMAT,
    CsvSync,
    DeltaExport,
    Dirt,
    GenericCsv,
)

log = logging.getLogger(__name__)

BLOCK = 50_000  # persons per block; fixed so a seed gives the same lake at any size
# Bumped whenever a seed and size give a different lake than before (2: names drawn by
# frequency; 3: seven-digit phone numbers); recorded in generator.json, and benchmarks
# key their cached lakes on it.
LAKE_VERSION = 3
DAY = records.DAY
HOUR = 3600
SOURCES = {"d365": [t.name for t in D365_TABLES], "dataverse": [t.name for t in DATAVERSE_TABLES]}
TRUTH_FILES = ("persons", "person_keys", "purchases", "cases")


@dataclass(kw_only=True)
class GenerateSummary(Summary[dict]):
    """What a generate run wrote, per table (printed by the CLI)."""

    landing: str  # the lake's landing folder or URI
    truth: Path
    sync: str  # folder timestamp of the sync written
    profile: str = "default"  # the lake's process profile (params.PROFILES)


def _epoch(date: str) -> int:
    return int(datetime.fromisoformat(date).replace(tzinfo=UTC).timestamp())


def _stamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime(SYNC_TS_FORMAT)


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config(
    settings: Settings, customers, seed, start, end, fmt, future_days=None, profile="default"
) -> GeneratorConfig:
    demo = settings.demo
    cfg = GeneratorConfig(
        profile=profile,
        process=process_profile(profile),
        customers=int(customers if customers is not None else demo.customers),
        seed=int(seed if seed is not None else demo.seed),
        start=str(start or demo.start),
        end=str(end or demo.end),
        fmt=fmt,
        **({} if future_days is None else {"shape": LakeShape(future_days=int(future_days))}),
    )
    if cfg.customers < 1:
        raise ValueError(f"customers must be at least 1, got {cfg.customers}")
    if fmt not in ("csv", "delta"):
        raise ValueError(f"format must be 'csv' or 'delta', got {fmt!r}")
    if _epoch(cfg.end) <= _epoch(cfg.start):
        raise ValueError(f"end {cfg.end} must be after start {cfg.start}")
    return cfg


def check_locations_url(url: str | None) -> str:
    """The lake root's https URL under which model.json names partitions absolutely
    (`https://<account>.dfs.core.windows.net/<container>/<path>`), checked; "" for none."""
    if not url:
        return ""
    location = parse_location(url)
    if location.scheme != "https" or ".dfs." not in location.host:
        raise ValueError(
            f"absolute locations {url!r}: expected the lake root as Synapse Link names it, "
            "https://<account>.dfs.core.windows.net/<container>/<path>"
        )
    return location.uri()


def _sync_url(base: str, source: str, stamp: str) -> str:
    return f"{base}/landing/{source}/{stamp}" if base else ""


def _clear(settings: Settings) -> None:
    """Remove the lake's layers and the truth (a new landing invalidates all of them)."""
    lake = Lake(settings.lake)
    for layer in LAYERS:
        lake.delete_folder(layer)
    shutil.rmtree(settings.truth, ignore_errors=True)


def _refuse_existing(settings: Settings) -> None:
    lake = Lake(settings.lake)
    if lake.remote:
        landed = bool(lake.store.folders(lake.key("landing")))
    else:
        landing = lake.path("landing")
        landed = landing.exists() and any(landing.iterdir())
    if (settings.truth / "generator.json").exists() or landed:
        raise ValueError(
            f"a generated lake already exists at {lake.uri('landing')} (truth "
            f"{settings.truth}); pass fresh=True (--fresh) to replace it or use --increment "
            "to extend it"
        )


@contextmanager
def _landing(settings: Settings) -> Iterator[Path]:
    """The folder this run writes its landing files to.

    Why staged on object storage: a CSV partition grows block by block, appended to as
    each block of persons is simulated, and a blob is written whole, never appended to. On
    a URI lake the run writes a local staging folder (beside the truth, on the project's
    disk) and uploads it once complete, each sync folder's model.json after its partitions
    as Synapse Link publishes one (so an ingest never reads half a sync); a run that fails
    uploads nothing. The truth stays local on every lake: pipelines never read it."""
    lake = Lake(settings.lake)
    if not lake.remote:
        yield lake.path("landing")
        return
    settings.truth.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".landing-", dir=settings.truth.parent) as staged:
        yield Path(staged)
        upload_folder(Path(staged), lake.store, lake.key("landing"))


class _TruthWriter:
    """Parquet writers for truth files and the pending (not yet published) rows."""

    def __init__(self, truth: Path):
        self.truth = truth
        self.writers: dict[str, pq.ParquetWriter] = {}

    def write(self, name: str, table: pa.Table) -> None:
        if name not in self.writers:
            path = self.truth / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[name] = pq.ParquetWriter(path, table.schema)
        self.writers[name].write_table(table)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _before(table: pa.Table, column: str, cut: int) -> np.ndarray:
    col = table.column(column)
    if pa.types.is_timestamp(col.type):
        values = col.cast(pa.int64()).to_numpy(zero_copy_only=False) // 1_000_000
    else:
        values = col.to_numpy(zero_copy_only=False)
    return values < cut


@dataclass(frozen=True)
class _Timeline:
    """Where the initial run's days fall: history up to `end`, then the future simulated
    for increments; `cut0` is midnight after `end`, the initial sync's cut-off."""

    start_epoch: int
    hist_days: int
    n_days: int  # history + future
    cut0: int
    total: int  # persons simulated: the customers plus those who enter in the future


def _timeline(cfg: GeneratorConfig) -> _Timeline:
    """The persons entering in the future keep the history's entry rate (per day)."""
    shape = cfg.shape
    start_epoch = _epoch(cfg.start)
    hist_days = (_epoch(cfg.end) - start_epoch) // DAY + 1
    n_future = int(
        round(cfg.customers * (1 - shape.pre_start_share) * shape.future_days / hist_days)
    )
    return _Timeline(
        start_epoch=start_epoch,
        hist_days=hist_days,
        n_days=hist_days + shape.future_days,
        cut0=start_epoch + hist_days * DAY,
        total=cfg.customers + n_future,
    )


class _InitialExport:
    """Where the initial run's rows go: rows due before cut0 to the sync (CSV folders or
    Delta tables), the generic CSV and the truth; later rows wait in truth/_pending for
    the increments that publish them."""

    def __init__(
        self,
        settings: Settings,
        landing: Path,
        cfg: GeneratorConfig,
        cut0: int,
        stamp: str,
        url: str = "",
    ):
        shape = cfg.shape
        dirt = Dirt(shape.duplicate_share, shape.malformed_share)
        self.cut0 = cut0
        self.syncs = {
            s: CsvSync(landing / s / stamp, s, _iso(cut0 + HOUR), dirt, _sync_url(url, s, stamp))
            for s in SOURCES
        }
        self.delta = DeltaExport(Lake(settings.lake)) if cfg.fmt == "delta" else None
        self.generic = GenericCsv(landing / "generic" / "transactions.csv")
        self.truth = _TruthWriter(settings.truth)
        self.pending = _TruthWriter(settings.truth / "_pending")
        self.stats = {"persons": 0, "purchases": 0, "sales_lines": 0}

    def publish(self, source: str, name: str, rows: pa.Table, rng: np.random.Generator) -> None:
        """One source table's change rows: the due ones to the sync, the rest pending."""
        due = _before(rows, "_emit", self.cut0)
        now, later = rows.filter(pa.array(due)), rows.filter(pa.array(~due))
        if self.delta is not None:
            self.delta.append(source, name, now)
            self.syncs[source].note_table(name)
        else:
            self.syncs[source].append(name, now, rng)
        self.pending.write(name, later)
        if name in ("salesline", "retailtransactionsalestrans"):
            self.stats["sales_lines"] += now.num_rows

    def write_block(self, block: records.Block, rng: np.random.Generator, n_persons: int) -> None:
        """Every table and truth frame of one person block (`rng`: the block's stream,
        which the CSV dirt draws continue)."""
        for source, names in SOURCES.items():
            for name in names:
                if name in block.tables:
                    self.publish(source, name, block.tables[name], rng)
        gen = block.tables["generic"]
        self.generic.append(gen.filter(pa.array(_before(gen, "_emit", self.cut0))))
        for name in ("persons", "person_keys"):
            self.truth.write(name, block.truth[name])
        for name in ("purchases", "cases"):
            frame = block.truth[name]
            due = _before(frame, "ts", self.cut0)
            self.truth.write(name, frame.filter(pa.array(due)))
            self.pending.write(name, frame.filter(pa.array(~due)))
            self.stats["purchases"] += int(due.sum()) if name == "purchases" else 0
        self.stats["persons"] += n_persons

    def close(self) -> None:
        self.truth.close()
        self.pending.close()
        for sync in self.syncs.values():
            if self.delta is None:
                sync.finish()


@writes_lake("generate")
def generate_lake(
    settings: Settings,
    customers: int | None = None,
    seed: int | None = None,
    start: str | None = None,
    end: str | None = None,
    fmt: str = "csv",
    fresh: bool = False,
    future_days: int | None = None,
    absolute_locations: str | None = None,
    profile: str = "default",
) -> GenerateSummary:
    """Write the initial full export of every source and the truth; None = demo settings.
    `profile`: the purchase/dropout process, a name in `params.PROFILES` ("sparse": shaped
    like a real retail log); recorded in generator.json, which increments and the oracle
    read it from.
    `future_days`: days simulated past `end` for increments (default LakeShape's 182; a
    simulated year of monthly increments needs more). `absolute_locations`: the lake
    root's https URL (`https://<account>.dfs.core.windows.net/<container>/<path>`); model.json
    then names each partition by its absolute location under it, as Synapse Link does
    (increments keep the form)."""
    url = check_locations_url(absolute_locations)
    cfg = _config(settings, customers, seed, start, end, fmt, future_days, profile)
    if fresh:
        _clear(settings)
    else:
        _refuse_existing(settings)
    tl = _timeline(cfg)
    ctx = records.Context(
        start_epoch=tl.start_epoch,
        n_days=tl.n_days,
        p=cfg.process,
        shape=cfg.shape,
        catalogue=records.make_catalogue(np.random.default_rng([cfg.seed, 7]), cfg.shape),
    )
    landing = Lake(settings.lake).uri("landing")
    stamp = _stamp(tl.cut0 + HOUR)
    counters = records.Counters()
    with _landing(settings) as folder:
        export = _InitialExport(settings, folder, cfg, tl.cut0, stamp, url)
        inventtable = records.inventtable_rows(ctx)
        export.publish("d365", "inventtable", inventtable, np.random.default_rng([cfg.seed, 8]))
        _generate_blocks(cfg, tl, ctx, export, counters)
        export.close()
    meta = _initial_meta(cfg, tl, stamp, counters, export)
    _write_meta(settings.truth, meta | ({"absolute_locations": url} if url else {}))
    log.info("generated %d persons into %s", tl.total, landing)
    return _summary(
        landing, settings.truth, stamp, export.syncs, export.delta, export.generic, cfg.profile
    )


def _generate_blocks(
    cfg: GeneratorConfig,
    tl: _Timeline,
    ctx: records.Context,
    export: _InitialExport,
    counters: records.Counters,
) -> None:
    """Simulate and write the persons block by block.

    Each block has its own rng stream ([seed, block]) and fixed size, so a person's
    records do not depend on how many persons come after it.
    """
    p, shape = cfg.process, cfg.shape
    seas = process.season_for_days(np.datetime64(cfg.start, "D"), tl.n_days, p)
    blocks = list(range(0, tl.total, BLOCK))
    with Progress(transient=True) as bar:
        task = bar.add_task("generating persons", total=tl.total)
        for b, lo in enumerate(blocks):
            rng = np.random.default_rng([cfg.seed, b])
            ids = np.arange(lo, min(lo + BLOCK, tl.total))
            traits = process.draw_traits(rng, ids, cfg.customers, tl.hist_days, tl.n_days, p, shape)
            sim = process.simulate(rng, traits, seas, p)
            block = records.build_block(rng, traits, sim, ctx, counters)
            export.write_block(block, rng, len(ids))
            bar.advance(task, len(ids))
            log.debug("block %d/%d done", b + 1, len(blocks))


def _initial_meta(
    cfg: GeneratorConfig,
    tl: _Timeline,
    stamp: str,
    counters: records.Counters,
    export: _InitialExport,
) -> dict:
    """generator.json of the initial run: what increments and the oracle need to continue
    (seed, time origin, parameters, counters) and what was written."""
    syncs = export.syncs.values()
    return {
        "lake_version": LAKE_VERSION,
        "seed": cfg.seed,
        "customers": cfg.customers,
        "persons_total": tl.total,
        "start": cfg.start,
        "end": cfg.end,
        "format": cfg.fmt,
        "profile": cfg.profile,
        "block_size": BLOCK,
        "start_epoch": tl.start_epoch,
        "n_days": tl.n_days,
        "hist_days": tl.hist_days,
        "cuts": [tl.cut0],
        "syncs": [stamp],
        "params": cfg.process.to_dict(),
        "shape": asdict(cfg.shape),
        "channels": channel_mapping(),
        "counters": asdict(counters),
        "stats": export.stats,
        "increments": [],
        "malformed": {s.source: {k: dict(c) for k, c in s.malformed.items()} for s in syncs},
        "duplicates": {s.source: dict(s.duplicates) for s in syncs},
        "rows": {s.source: dict(s.rows) for s in syncs},
        "generic_rows": export.generic.rows,
    }


def _write_meta(truth: Path, meta: dict) -> None:
    truth.mkdir(parents=True, exist_ok=True)
    (truth / "generator.json").write_text(json.dumps(meta, indent=2))
    # The reference training compares its test figures with (c360ml.model.reference).
    reference = {"churn_probability": "c360ml.synth.oracle:churn_probability"}
    (truth / "reference.json").write_text(json.dumps(reference))


def read_meta(truth: Path) -> dict:
    path = truth / "generator.json"
    if not path.exists():
        raise FileNotFoundError(f"no generated lake: {path} is missing (run `c360ml generate`)")
    return json.loads(path.read_text())


def _summary(landing, truth, stamp, syncs, delta, generic, profile) -> GenerateSummary:
    summary = GenerateSummary(landing=landing, truth=truth, sync=stamp, profile=profile)
    for source, names in SOURCES.items():
        sync = syncs[source]
        for name in names:
            if delta is not None:
                rows, files, bad, dup = delta.rows.get(name, 0), 1, 0, 0
            else:
                rows, files = sync.rows.get(name, 0), sync.files(name)
                bad = sum(sync.malformed.get(name, {}).values())
                dup = sync.duplicates.get(name, 0)
            summary.items.append(
                {
                    "source": source,
                    "table": name,
                    "rows": int(rows),
                    "files": int(files),
                    "duplicates": int(dup),
                    "malformed": int(bad),
                }
            )
    if generic is not None:
        summary.items.append(
            {
                "source": "generic",
                "table": "transactions",
                "rows": generic.rows,
                "files": 1,
                "duplicates": 0,
                "malformed": 0,
            }
        )
    return summary


# ----------------------------------------------------------------------------- increments


@writes_lake("generate --increment")
def generate_increment(
    settings: Settings, seed: int | None = None, shock: str | None = None
) -> GenerateSummary:
    """Append the next weekly sync: due pending rows, plus deletes of erased persons.
    `shock` ("DATE:KIND", `synth.shock`): a regime change applied to the simulated future
    from DATE (not before this increment's first day) before the sync is written."""
    parsed = shock_mod.parse_shock(shock) if shock is not None else None
    meta = read_meta(settings.truth)
    shape = LakeShape(**meta["shape"])
    k = len(meta["increments"]) + 1
    cut_prev = meta["cuts"][-1]
    cut = cut_prev + shape.increment_days * DAY
    sim_end = meta["start_epoch"] + meta["n_days"] * DAY
    if cut > sim_end:
        raise ValueError(
            f"increment {k} would reach past the simulated future ({_iso(sim_end)}); "
            "regenerate with a later --end"
        )
    rng = np.random.default_rng([meta["seed"] if seed is None else seed, 1_000_000 + k])
    truth_dir, pend = settings.truth, settings.truth / "_pending"
    if parsed is not None:
        entry = shock_mod.apply_shock(truth_dir, meta, *parsed, cut_prev, int(meta["seed"]))
        meta.setdefault("shocks", []).append(entry | {"increment": k})
    erased = _choose_erased(rng, truth_dir, meta, cut_prev, shape)
    erased_ts = dict(
        zip(
            erased["person_id"].to_pylist(),
            erased["erased_at"].cast(pa.int64()).to_numpy() // 1_000_000,
            strict=True,
        )
    )
    stamp = _stamp(cut + HOUR)
    landing = Lake(settings.lake).uri("landing")
    dirt = Dirt(shape.duplicate_share, shape.malformed_share)
    url = meta.get("absolute_locations", "")
    with _landing(settings) as folder:
        syncs = {
            s: CsvSync(folder / s / stamp, s, _iso(cut + HOUR), dirt, _sync_url(url, s, stamp))
            for s in SOURCES
        }
        delta = DeltaExport(Lake(settings.lake)) if meta["format"] == "delta" else None
        deletes = _erasure_deletes(rng, truth_dir, pend, erased, erased_ts)
        for source, names in SOURCES.items():
            for name in names:
                path = pend / f"{name}.parquet"
                rows = pq.read_table(path) if path.exists() else None
                if rows is None:
                    continue
                keep = _not_erased(rows, "_person", "_emit", erased_ts)
                due = keep & _before(rows, "_emit", cut)
                now = rows.filter(pa.array(due))
                if name in deletes:
                    now = pa.concat_tables([now, deletes[name]])
                pq.write_table(rows.filter(pa.array(keep & ~due)), path)
                if delta is not None:
                    delta.apply_changes(source, name, now)
                else:
                    syncs[source].append(name, now, rng)
        for name in ("purchases", "cases"):
            path = pend / f"{name}.parquet"
            rows = pq.read_table(path)
            keep = _not_erased(rows, "person_id", "ts", erased_ts)
            due = keep & _before(rows, "ts", cut)
            pq.write_table(rows.filter(pa.array(keep & ~due)), path)
            done = pq.read_table(truth_dir / f"{name}.parquet")
            pq.write_table(
                pa.concat_tables([done, rows.filter(pa.array(due))]), truth_dir / f"{name}.parquet"
            )
        erased = erased.append_column("increment", pa.array(np.full(erased.num_rows, k)))
        old = truth_dir / "erased.parquet"
        all_erased = pa.concat_tables([pq.read_table(old), erased]) if old.exists() else erased
        pq.write_table(all_erased, old)
        if delta is None:
            for sync in syncs.values():
                sync.finish()
    meta["cuts"].append(cut)
    meta["syncs"].append(stamp)
    meta["increments"].append(
        {
            "n": k,
            "sync": stamp,
            "cut": _iso(cut),
            "erased": erased.num_rows,
            "rows": {s.source: dict(s.rows) for s in syncs.values()},
            "malformed": {
                s.source: {t: dict(c) for t, c in s.malformed.items()} for s in syncs.values()
            },
            "duplicates": {s.source: dict(s.duplicates) for s in syncs.values()},
        }
    )
    _write_meta(truth_dir, meta)
    log.info("increment %d written to %s (%d persons erased)", k, stamp, erased.num_rows)
    # The future was simulated with the lake's profile; lakes from before profiles: default.
    return _summary(landing, truth_dir, stamp, syncs, delta, None, meta.get("profile", "default"))


def _not_erased(rows: pa.Table, person_col: str, time_col: str, erased_ts: dict) -> np.ndarray:
    """Rows that survive erasure: not of an erased person at or after its erasure."""
    if not erased_ts:
        return np.ones(rows.num_rows, dtype=bool)
    person = rows.column(person_col).to_numpy(zero_copy_only=False)
    ids = np.fromiter(erased_ts.keys(), dtype=np.int64)
    when = np.fromiter(erased_ts.values(), dtype=np.int64)
    order = np.argsort(ids)
    ids, when = ids[order], when[order]
    pos = np.clip(np.searchsorted(ids, person), 0, len(ids) - 1)
    hit = ids[pos] == person
    col = rows.column(time_col)
    secs = (
        col.cast(pa.int64()).to_numpy(zero_copy_only=False) // 1_000_000
        if pa.types.is_timestamp(col.type)
        else col.to_numpy(zero_copy_only=False)
    )
    return ~(hit & (secs >= when[pos]))


def _choose_erased(rng, truth_dir: Path, meta: dict, cut_prev: int, shape: LakeShape) -> pa.Table:
    """A few existing, not yet erased persons, erased at a time inside the new week."""
    persons = pq.read_table(truth_dir / "persons.parquet", columns=["person_id", "created"])
    created = persons["created"].cast(pa.int64()).to_numpy() // 1_000_000
    ids = persons["person_id"].to_numpy()
    candidates = ids[created < cut_prev]
    old = truth_dir / "erased.parquet"
    if old.exists():
        candidates = np.setdiff1d(candidates, pq.read_table(old)["person_id"].to_numpy())
    n = min(len(candidates), max(1, int(round(shape.erase_share * meta["customers"]))))
    chosen = np.sort(rng.choice(candidates, n, replace=False))
    when = cut_prev + rng.integers(HOUR, shape.increment_days * DAY - HOUR, n)
    return pa.table(
        {
            "person_id": pa.array(chosen, type=pa.int64()),
            "erased_at": pa.array(when * 1_000_000, type=pa.timestamp("us", tz="UTC")),
        }
    )


def _erasure_deletes(rng, truth_dir: Path, pend: Path, erased: pa.Table, erased_ts: dict) -> dict:
    """IsDelete rows for the erased persons' customer, party, name, e-mail/phone and contact."""
    if erased.num_rows == 0:
        return {}
    persons = pq.read_table(truth_dir / "persons.parquet").to_pandas()
    persons = persons[persons.person_id.isin(erased_ts)]
    keys = pq.read_table(truth_dir / "person_keys.parquet").to_pandas()
    keys = keys[keys.person_id.isin(erased_ts)]
    out: dict[str, list[pa.Table]] = {}
    acc = keys[keys.source == "d365"].copy()
    # list-wise, not expand=True: an erased contact-only person has no account at all
    split = acc.source_key.str.split("-", n=1)
    acc["area"], acc["accountnum"] = split.str[0], split.str[1]
    acc["seq"] = acc.accountnum.str[1:].astype(np.int64)
    acc = acc.merge(persons[["person_id", "renamed", "has_phone", "kind"]], on="person_id")
    acc["when"] = acc.person_id.map(erased_ts).astype(np.int64)
    rec1 = RECID_BASE + acc.seq.to_numpy()
    rec2 = RECID_BASE + 2 * acc.seq.to_numpy()
    org = (acc.kind == "organisation").to_numpy()
    plan = [
        ("custtable", rec1, np.ones(len(acc), bool)),
        ("dirpartytable", rec1, np.ones(len(acc), bool)),
        ("dirpersonname", rec2, ~org),
        ("dirpersonname", rec2 + 1, ~org & acc.renamed.to_numpy()),
        ("logisticselectronicaddress", rec2, np.ones(len(acc), bool)),
        ("logisticselectronicaddress", rec2 + 1, acc.has_phone.to_numpy()),
    ]
    for name, recid, mask in plan:
        not_yet = _created_later(pend / f"{name}.parquet", "recid", recid, acc.when.to_numpy())
        idx = np.flatnonzero(mask & ~not_yet)
        when = acc.when.to_numpy()[idx]
        cols = (
            {"accountnum": pa.array(acc.accountnum.to_numpy()[idx])} if name == "custtable" else {}
        )
        out.setdefault(name, []).append(
            records.fo_frame(
                name,
                cols,
                recid[idx],
                when,
                when,
                pa.array(acc.area.to_numpy()[idx]),
                acc.person_id.to_numpy()[idx],
                rng,
                is_delete=True,
            )
        )
    con = keys[keys.source == "dataverse"]
    when = con.person_id.map(erased_ts).to_numpy().astype(np.int64)
    not_yet = _created_later(pend / "contact.parquet", "contactid", con.source_key.to_numpy(), when)
    con, when = con[~not_yet], when[~not_yet]
    ids = pa.array(con.source_key.to_numpy(), type=pa.string())
    cols = {"contactid": ids, "createdon": when}
    out["contact"] = [
        records.dv_frame("contact", cols, ids, when, con.person_id.to_numpy(), rng, is_delete=True)
    ]
    # the delete must not carry a createdon the row never had: use the erasure time's
    # year for partitioning (documented); readers key on contactid.
    return {name: pa.concat_tables(frames) for name, frames in out.items()}


def _created_later(path: Path, key: str, values: np.ndarray, when: np.ndarray) -> np.ndarray:
    """True where the record's creation is still pending at `when` (it does not exist yet)."""
    if not path.exists() or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    created_col = "createdon" if key == "contactid" else "createddatetime"
    rows = pq.read_table(path, columns=[key, created_col])
    lookup = dict(zip(rows[key].to_pylist(), rows[created_col].to_pylist(), strict=True))
    created = np.array([lookup.get(x, -(2**62)) or -(2**62) for x in values.tolist()])
    return created >= when


__all__ = ["GenerateSummary", "generate_increment", "generate_lake", "read_meta"]
