"""`c360ml report`: one self-contained HTML page (the part Power BI plays in the reference).

Everything is inline (plotly's JavaScript, the model's PNG plots as data URIs), so the
page opens with no network. Key figures carry element ids (`profile-count`,
`scored-count`, `risk-High`, ...) so a browser test can compare them with the tables.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from c360ml.config import Settings
from c360ml.lake import Lake
from c360ml.refresh import follow_redirects

log = logging.getLogger(__name__)

MODEL_PLOTS = ("roc", "lift", "calibration")  # logged PNGs embedded when present


# ---------------------------------------------------------------- pure stages


def latest(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame[frame[column] == frame[column].max()] if len(frame) else frame


def top_factors(scores: pd.DataFrame, n: int = 15) -> pd.DataFrame:
    """Features by mean |impact| over all scored customers' InfluentialFactors."""
    rows = []
    for text in scores["InfluentialFactors"].dropna():
        rows.extend(json.loads(text))
    if not rows:
        return pd.DataFrame(columns=["feature", "mean_abs_impact", "customers"])
    factors = pd.DataFrame(rows)
    factors["abs"] = factors["impact"].abs()
    out = factors.groupby("feature").agg(mean_abs_impact=("abs", "mean"), customers=("abs", "size"))
    return out.sort_values("customers", ascending=False).head(n).reset_index()


def segment_moves(members: pd.DataFrame, redirects: pd.DataFrame) -> pd.DataFrame:
    """Size, entered and left per segment at the latest as_of vs the one before."""
    from c360ml.segments import movements

    if members.empty:
        return pd.DataFrame(columns=["segment", "size", "entered", "left"])
    dates = sorted(members["as_of"].unique())
    current = members[members["as_of"] == dates[-1]]
    previous = members[members["as_of"] == dates[-2]] if len(dates) > 1 else members.iloc[0:0]
    return movements(current, previous, redirects)


def _figure(fig: go.Figure, first: bool) -> str:
    fig.update_layout(height=360, margin={"l": 40, "r": 20, "t": 40, "b": 40})
    return pio.to_html(fig, full_html=False, include_plotlyjs="inline" if first else False)


def _table(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(
        index=False, border=0, classes="data", table_id=table_id, float_format=lambda v: f"{v:,.4f}"
    )


def render(sections: dict[str, Any]) -> str:
    """The page from already computed figures and tables (pure, testable)."""
    charts, first = [], True
    for title, fig in sections["charts"]:
        charts.append(f"<h3>{html.escape(title)}</h3>{_figure(fig, first)}")
        first = False
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{name}</figcaption></figure>"
        for name, data in sections["images"]
    )
    figures = "".join(
        f'<div class="kpi"><span class="label">{html.escape(label)}</span>'
        f'<span class="value" id="{key}">{value}</span></div>'
        for key, label, value in sections["kpis"]
    )
    tables = "".join(f"<h3>{html.escape(t)}</h3>{_table(f, i)}" for t, i, f in sections["tables"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>c360ml retention report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
.kpis {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
.kpi {{ border: 1px solid #ddd; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }}
.kpi .label {{ display: block; font-size: .8rem; color: #666; }}
.kpi .value {{ font-size: 1.4rem; font-weight: 600; }}
table.data {{ border-collapse: collapse; font-size: .85rem; }}
table.data td, table.data th {{ padding: .2rem .6rem; border-bottom: 1px solid #eee; }}
figure {{ display: inline-block; margin: .5rem; }} img {{ max-width: 420px; }}
</style></head><body>
<h1>Customer retention report</h1>
<p>{html.escape(sections["subtitle"])}</p>
<div class="kpis">{figures}</div>
{tables}
{"".join(charts)}
<h2>Model performance (test cutoff, from the model's MLflow run)</h2>
{images}
</body></html>
"""


# ---------------------------------------------------------------- lake and MLflow edges


def _model_run(settings: Settings) -> tuple[dict[str, Any], list[tuple[str, str]], str]:
    """The champion's test metrics and grade, its PNG plots (base64) and a label."""
    try:
        import mlflow

        mlflow.set_tracking_uri(settings.tracking_uri)
        client = mlflow.MlflowClient()
        mv = client.get_model_version_by_alias(settings.model_name, "champion")
        run = client.get_run(mv.run_id)
        images = []
        for art in client.list_artifacts(mv.run_id, "plots"):
            stem = Path(art.path).stem
            if art.path.endswith(".png") and any(p in stem for p in MODEL_PLOTS):
                local = mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id, artifact_path=art.path
                )
                images.append((stem, base64.b64encode(Path(local).read_bytes()).decode()))
        figures = {**run.data.metrics, "grade": run.data.tags.get("grade", "")}
        return figures, images, f"{settings.model_name} v{mv.version}"
    except Exception as exc:  # the report still renders the lake's figures
        log.warning("no champion run for the report: %s", exc)
        return {}, [], "no champion"


def build_report(settings: Settings) -> Path:
    lake = Lake(settings.lake)
    profiles = lake.read_pandas("gold", "customer_profile")
    scores = latest(lake.read_pandas("gold", "churn_scores"), "ScoredAsOf")
    as_of = scores["ScoredAsOf"].max()
    scored = scores[scores["ScoreStatus"] == "scored"]
    risk = scored["RiskLevel"].value_counts().reindex(["Low", "Medium", "High"], fill_value=0)
    members = (
        lake.read_pandas("gold", "segment_membership")
        if lake.exists("gold", "segment_membership")
        else pd.DataFrame(columns=["segment", "customer_id", "as_of"])
    )
    redirects = (
        lake.read_pandas("gold", "customer_id_redirects")
        if lake.exists("gold", "customer_id_redirects")
        else pd.DataFrame(columns=["retired_id", "surviving_id"])
    )
    members = members.assign(customer_id=follow_redirects(members["customer_id"], redirects))
    moves = segment_moves(members, redirects)
    metrics, images, model_label = _model_run(settings)
    perf = pd.DataFrame(
        [
            {"metric": k, "value": v}
            for k, v in sorted(metrics.items())
            if k.startswith(("test_", "rfm_logistic_", "recency_", "ci_d_rule_"))
        ]
    )
    sources = profiles["sources"].value_counts().rename_axis("sources").reset_index(name="profiles")
    charts = [
        (
            "Churn-risk distribution (scored profiles)",
            go.Figure(go.Bar(x=risk.index.tolist(), y=risk.to_numpy().tolist())),
        ),
        ("ChurnScore histogram", go.Figure(go.Histogram(x=scored["ChurnScore"], nbinsx=40))),
    ]
    factors = top_factors(scored)
    if len(factors):
        charts.append(
            (
                "Top influential factors (how often in a customer's top 5)",
                go.Figure(go.Bar(x=factors["customers"], y=factors["feature"], orientation="h")),
            )
        )
    if lake.exists("gold", "customer_measures"):
        measures = latest(lake.read_pandas("gold", "customer_measures"), "as_of")
        for col in [c for c in measures.columns if c not in ("customer_id", "as_of")][:4]:
            if pd.api.types.is_numeric_dtype(measures[col]):
                charts.append((f"Measure: {col}", go.Figure(go.Histogram(x=measures[col]))))
    kpis = [
        ("profile-count", "Profiles", f"{len(profiles):,}"),
        ("scored-count", "Scored", f"{len(scored):,}"),
        *[(f"risk-{k}", f"{k} risk", f"{int(v):,}") for k, v in risk.items()],
        ("model", "Model", html.escape(model_label)),
        ("grade", "Grade", html.escape(str(metrics.get("grade", "")) or "see card")),
    ]
    sections = {
        "subtitle": f"Scores as of {as_of:%Y-%m-%d %H:%M} UTC; {model_label}",
        "kpis": kpis,
        "tables": [
            ("Profiles by source", "sources", sources),
            (
                "Score status",
                "status",
                scores["ScoreStatus"]
                .value_counts()
                .rename_axis("status")
                .reset_index(name="profiles"),
            ),
            ("Segments: size and movement since the previous as_of", "segments", moves),
            ("Model vs baselines (test cutoff)", "performance", perf),
        ],
        "charts": charts,
        "images": images,
    }
    out = settings.path(settings.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "retention_report.html"
    path.write_text(render(sections))
    return path
