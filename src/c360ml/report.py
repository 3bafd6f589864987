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
from c360ml.medallion.unify import follow_redirects, read_redirects
from c360ml.model import drift, watch
from c360ml.model import report as model_report
from c360ml.storage.lake import Lake

log = logging.getLogger(__name__)

MODEL_PLOTS = ("roc", "pr", "shap_summary")  # logged PNGs embedded in the appendix
RISK_LEVELS = ["Low", "Medium", "High"]


# ---------------------------------------------------------------- pure stages


def latest(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame[frame[column] == frame[column].max()] if len(frame) else frame


def top_factors(scores: pd.DataFrame, n: int = 15) -> pd.DataFrame:
    """Features by how often they are among a scored customer's top 5 reasons, with their
    readable label and mean |impact|. The factors' JSON is read by DuckDB: a million
    customers' five reasons each are too many to parse row by row in Python."""
    from c360ml.medallion.sql import duckdb_connection

    shape = json.dumps([{"feature": "VARCHAR", "label": "VARCHAR", "impact": "DOUBLE"}])
    con = duckdb_connection()
    try:
        con.register("scores", scores[["InfluentialFactors"]])
        # a score written before factors carried labels is labelled by its feature's name
        return con.sql(f"""
            SELECT f.feature AS feature, COALESCE(f.label, f.feature) AS label,
                   AVG(ABS(f.impact)) AS mean_abs_impact, COUNT(*) AS customers
            FROM (SELECT unnest(from_json(InfluentialFactors, '{shape}')) AS f
                  FROM scores WHERE InfluentialFactors IS NOT NULL) q
            GROUP BY ALL ORDER BY customers DESC, feature LIMIT {int(n)}""").df()
    finally:
        con.close()


def segment_moves(members: pd.DataFrame, redirects: pd.DataFrame) -> pd.DataFrame:
    """Size, entered and left per segment at the latest as_of vs the one before."""
    from c360ml.segments import movements

    if members.empty:
        return pd.DataFrame(columns=["segment", "size", "entered", "left"])
    dates = sorted(members["as_of"].unique())
    current = members[members["as_of"] == dates[-1]]
    previous = members[members["as_of"] == dates[-2]] if len(dates) > 1 else members.iloc[0:0]
    return movements(current, previous, redirects)


def _figure(fig: go.Figure, first: bool, height: int = 320) -> str:
    fig.update_layout(height=height, margin={"l": 40, "r": 20, "t": 30, "b": 40})
    return pio.to_html(fig, full_html=False, include_plotlyjs="inline" if first else False)


def _table(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(
        index=False, border=0, classes="data", table_id=table_id, float_format=lambda v: f"{v:,.4f}"
    )


def model_charts(model: dict[str, Any], factors: pd.DataFrame) -> list[tuple[str, go.Figure]]:
    """The model page's charts from the champion's logged evaluation (aggregates only)."""
    m = model["metrics"]
    charts = []
    bars = [
        ("c360ml model", "test_roc_auc"),
        ("RFM logistic", "rfm_logistic_roc_auc"),
        ("Days since last purchase", "recency_roc_auc"),
        ("Oracle (true probability)", "oracle_roc_auc"),
    ]
    bars = [(name, key) for name, key in bars if key in m]
    if bars:
        low = [m[k] - m.get(f"{k}_ci_low", m[k]) for _, k in bars]
        high = [m.get(f"{k}_ci_high", m[k]) - m[k] for _, k in bars]
        fig = go.Figure(
            go.Bar(
                x=[name for name, _ in bars],
                y=[m[k] for _, k in bars],
                error_y={"type": "data", "array": high, "arrayminus": low},
                text=[f"{m[k]:.3f}" for _, k in bars],
            )
        )
        fig.update_yaxes(range=[0.5, 1.0], title="ROC AUC (0.5 = guessing)")
        charts.append(("How well it ranks who will churn, against simple baselines", fig))
    if model["gains"]:
        g = pd.DataFrame(model["gains"])
        fig = go.Figure(
            [
                go.Scatter(
                    x=[0.0, *g.share_targeted], y=[0.0, *g.share_of_churners], name="c360ml model"
                ),
                go.Scatter(x=[0, 1], y=[0, 1], name="random", line={"dash": "dot"}),
            ]
        )
        fig.update_xaxes(title="share of customers targeted, highest score first", tickformat=".0%")
        fig.update_yaxes(title="share of churners reached", tickformat=".0%")
        charts.append(("Cumulative gain: churners reached by targeting the top scores", fig))
        fig = go.Figure(go.Bar(x=g.share_targeted, y=g.lift))
        fig.update_xaxes(title="share of customers targeted", tickformat=".0%")
        fig.update_yaxes(title="lift (x the average churn rate)")
        charts.append(("Lift", fig))
    if model["reliability"]:
        r = pd.DataFrame(model["reliability"])
        fig = go.Figure(
            [
                go.Scatter(
                    x=r.mean_predicted, y=r.observed_rate, mode="lines+markers", name="model"
                ),
                go.Scatter(x=[0, 1], y=[0, 1], name="perfect", line={"dash": "dot"}),
            ]
        )
        fig.update_xaxes(title="predicted churn probability", tickformat=".0%")
        fig.update_yaxes(title="observed churn rate", tickformat=".0%")
        charts.append(("Calibration: predicted against observed churn", fig))
    estimates, outcomes = model.get("estimates"), model.get("outcomes")
    has_estimates = estimates is not None and len(estimates) > 1
    if has_estimates or (outcomes is not None and len(outcomes)):
        fig = go.Figure()
        if has_estimates:
            fig.add_scatter(
                x=estimates.index,
                y=estimates.to_numpy(),
                mode="lines+markers",
                name="estimated when scored (label-free)",
            )
        if outcomes is not None and len(outcomes):
            o = outcomes.sort_values("ScoredAsOf")
            population = o["population"] if "population" in o else pd.Series("all", o.index)
            for group, name in (("all", "realized"), ("control", "realized, control groups")):
                part = o[population == group]
                if len(part):
                    fig.add_scatter(
                        x=part["ScoredAsOf"], y=part["roc_auc"], mode="lines+markers", name=name
                    )
        if "test_roc_auc" in m:
            fig.add_hline(y=m["test_roc_auc"], line_dash="dot", annotation_text="at training")
        fig.update_yaxes(title="ROC AUC of the scores of each as_of")
        charts.append(("How the scores are doing: estimated, then realized", fig))
    if outcomes is not None and len(outcomes) and "mean_score" in outcomes:
        # the level, which ROC AUC cannot see: a shift of everyone's risk shows here
        o = outcomes[outcomes["population"] == "all"].sort_values("ScoredAsOf")
        fig = go.Figure()
        for col, name in (
            ("mean_score", "predicted (mean ChurnScore)"),
            ("churn_rate", "realized"),
        ):
            fig.add_scatter(x=o["ScoredAsOf"], y=o[col], mode="lines+markers", name=name)
        fig.update_yaxes(title="churn rate of the scored customers", tickformat=".0%")
        charts.append(("Predicted against realized churn rate, per closed window", fig))
    if len(factors):
        ordered = factors.iloc[::-1]
        fig = go.Figure(go.Bar(x=ordered["customers"], y=ordered["label"], orientation="h"))
        fig.update_xaxes(title="customers for whom it is a top-5 reason")
        charts.append(("What drives churn risk", fig))
    return charts


def risk_band_table(scored: pd.DataFrame, model: dict[str, Any]) -> pd.DataFrame:
    """Profiles per risk band now, beside each band's churn rate on the test cutoff."""
    now = scored["RiskLevel"].value_counts().reindex(RISK_LEVELS, fill_value=0)
    test = {b["risk_level"]: b for b in model["risk_bands"]}
    return pd.DataFrame(
        {
            "risk level": RISK_LEVELS,
            "profiles now": [f"{int(now[b]):,}" for b in RISK_LEVELS],
            "share now": [f"{now[b] / max(now.sum(), 1):.0%}" for b in RISK_LEVELS],
            "churn rate on the test cutoff": [
                _percent(test.get(b, {}).get("churn_rate")) for b in RISK_LEVELS
            ],
        }
    )


def drift_table(alarms: dict[str, Any] | None, psi_alarm: float) -> pd.DataFrame:
    """What crossed `watch.psi_alarm` at the latest refresh, worst first (one line saying
    so when nothing did, or when no drift was measured yet)."""
    if alarms is None:
        return pd.DataFrame({"drift": ["not measured yet (no refresh with this model)"]})
    if not alarms["alarms"]:
        score = alarms["score_psi"]
        text = f"nothing at PSI >= {psi_alarm} (score PSI {score:.3f})" if score is not None else ""
        return pd.DataFrame({"drift": [text or f"nothing at PSI >= {psi_alarm}"]})
    return pd.DataFrame(
        {
            "column": [a["label"] for a in alarms["alarms"]],
            "PSI": [f"{a['psi']:.3f}" for a in alarms["alarms"]],
            "outside the tested range": [
                f"{a['share_outside_range']:.1%}" for a in alarms["alarms"]
            ],
        }
    )


def _percent(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.0%}"


def render(sections: dict[str, Any]) -> str:
    """The page from already computed figures and tables (pure, testable): the model page
    first, then profiles and segments, then an appendix with the full metric table and
    the feature glossary (the only place feature expressions appear)."""
    first = True

    def charts(items: list[tuple[str, go.Figure]]) -> str:
        nonlocal first
        out = []
        for title, fig in items:
            out.append(
                f'<div class="chart"><h3>{html.escape(title)}</h3>{_figure(fig, first)}</div>'
            )
            first = False
        return f'<div class="grid">{"".join(out)}</div>'

    def tables(items: list[tuple[str, str, pd.DataFrame]]) -> str:
        return "".join(f"<h3>{html.escape(t)}</h3>{_table(f, i)}" for t, i, f in items)

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
    model_page = charts(sections["model_charts"]) + tables(sections["model_tables"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>c360ml retention report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem 2rem; color: #222; }}
.kpis {{ display: flex; flex-wrap: wrap; gap: .8rem; }}
.kpi {{ border: 1px solid #ddd; border-radius: 6px; padding: .5rem .9rem; min-width: 8rem; }}
.kpi .label {{ display: block; font-size: .8rem; color: #666; }}
.kpi .value {{ font-size: 1.3rem; font-weight: 600; }}
.grade {{ font-size: 1.05rem; max-width: 70rem; background: #f5f7fa; padding: .6rem 1rem;
  border-left: 4px solid #4063d8; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: .5rem; }}
.chart h3 {{ font-size: .95rem; margin: .6rem 0 0; }}
table.data {{ border-collapse: collapse; font-size: .85rem; }}
table.data td, table.data th {{ padding: .2rem .6rem; border-bottom: 1px solid #eee; text-align: left; }}
figure {{ display: inline-block; margin: .5rem; }} img {{ max-width: 420px; }}
</style></head><body>
<h1>Customer retention report</h1>
<p>{html.escape(sections["subtitle"])}</p>
<div class="kpis">{figures}</div>
<h2 id="model-page">The churn model</h2>
<p class="grade" id="grade-sentence">{html.escape(sections["grade_sentence"])}</p>
{model_page}
<h2 id="profiles">Profiles and segments</h2>
{charts(sections["charts"])}
{tables(sections["tables"])}
<h2 id="appendix">Appendix: all test metrics and the feature glossary</h2>
{tables(sections["appendix"])}
{images}
</body></html>
"""


# ---------------------------------------------------------------- lake and MLflow edges


def _model_run(settings: Settings) -> dict[str, Any]:
    """The champion's logged test metrics, grade, evaluation tables and PNG plots."""
    empty = {"metrics": {}, "grade": "", "label": "no champion", "images": []}
    empty |= {"gains": [], "reliability": [], "risk_bands": []}
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
        tables = {}
        for name in ("gains", "reliability", "risk_bands"):
            try:
                tables[name] = json.loads(
                    mlflow.artifacts.load_text(f"runs:/{mv.run_id}/evaluation/{name}.json")
                )
            except Exception:  # runs logged before the table existed
                tables[name] = []
        return {
            "metrics": run.data.metrics,
            "grade": run.data.tags.get("grade", ""),
            "label": f"{settings.model_name} v{mv.version}",
            "images": images,
            **tables,
        }
    except Exception as exc:  # the report still renders the lake's figures
        log.warning("no champion run for the report: %s", exc)
        return empty


def _model_view(settings: Settings, lake: Lake) -> dict[str, Any]:
    """The champion's run, with its realized outcomes and the label-free estimates of
    its AUC per scored as_of (the trend the report draws)."""
    model = _model_run(settings)
    if lake.exists("gold", "score_outcomes"):
        model["outcomes"] = lake.read_pandas("gold", "score_outcomes")
    history = lake.read_pandas("gold", "churn_scores", columns=["ChurnScore", "ScoredAsOf"])
    model["estimates"] = (
        history.dropna(subset=["ChurnScore"])
        .groupby("ScoredAsOf")["ChurnScore"]
        .apply(lambda p: watch.estimated_roc_auc(p.to_numpy()))
    )
    return model


def _charts(lake: Lake, risk: pd.Series, scored: pd.DataFrame) -> list[tuple[str, go.Figure]]:
    """The risk bands, the score histogram and the first numeric measures."""
    charts = [
        (
            "Churn-risk distribution (scored profiles)",
            go.Figure(go.Bar(x=risk.index.tolist(), y=risk.to_numpy().tolist())),
        ),
        ("ChurnScore histogram", go.Figure(go.Histogram(x=scored["ChurnScore"], nbinsx=40))),
    ]
    if lake.exists("gold", "customer_measures"):
        measures = latest(lake.read_pandas("gold", "customer_measures"), "as_of")
        for col in [c for c in measures.columns if c not in ("customer_id", "as_of")][:4]:
            if pd.api.types.is_numeric_dtype(measures[col]):
                charts.append((f"Measure: {col}", go.Figure(go.Histogram(x=measures[col]))))
    return charts


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
    redirects = read_redirects(lake)
    members = members.assign(customer_id=follow_redirects(members["customer_id"], redirects))
    moves = segment_moves(members, redirects)
    model = _model_view(settings, lake)
    metrics, model_label = model["metrics"], model["label"]
    scored_by = str(scores["ModelVersion"].dropna().iloc[0]) if len(scored) else None
    alarms = (
        drift.latest_alarms(lake.read_pandas("gold", "score_drift"), scored_by)
        if lake.exists("gold", "score_drift")
        else None
    )
    psi_alarm = settings.watch.psi_alarm
    sources = profiles["sources"].value_counts().rename_axis("sources").reset_index(name="profiles")
    charts = _charts(lake, risk, scored)
    factors = top_factors(scored)
    kpis = [
        ("profile-count", "Profiles", f"{len(profiles):,}"),
        ("scored-count", "Scored", f"{len(scored):,}"),
        *[(f"risk-{k}", f"{k} risk", f"{int(v):,}") for k, v in risk.items()],
        ("model", "Model", html.escape(model_label)),
        ("grade", "Grade", html.escape(model["grade"] or "–")),
        ("drift-alarms", "Drift alarms", "–" if alarms is None else str(len(alarms["alarms"]))),
    ]
    grade = "No champion model: run `c360ml train`."
    if metrics and model["grade"]:
        grade = model_report.grade_sentence(metrics, model["grade"])
    glossary = factors[["label", "feature"]].rename(
        columns={"label": "label", "feature": "definition (Featuretools expression)"}
    )
    sections = {
        "subtitle": f"Scores as of {as_of:%Y-%m-%d %H:%M} UTC; {model_label}",
        "kpis": kpis,
        "grade_sentence": grade,
        "model_charts": model_charts(model, factors),
        "model_tables": [
            ("Risk bands", "risk-bands", risk_band_table(scored, model)),
            (
                f"Drift at the latest refresh: PSI at or above {psi_alarm} against the test rows",
                "drift",
                drift_table(alarms, psi_alarm),
            ),
        ],
        "tables": [
            ("Segments: size and movement since the previous as_of", "segments", moves),
            (
                "Score status",
                "status",
                scores["ScoreStatus"]
                .value_counts()
                .rename_axis("status")
                .reset_index(name="profiles"),
            ),
            ("Profiles by source", "sources", sources),
        ],
        "charts": charts,
        "appendix": [
            (
                "Test-cutoff metrics: the model and each baseline (95% intervals)",
                "performance",
                pd.DataFrame(model_report.metric_rows(metrics) if metrics else []),
            ),
            ("Feature glossary", "glossary", glossary),
        ],
        "images": model["images"],
    }
    out = settings.path(settings.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "retention_report.html"
    path.write_text(render(sections))
    return path
