"""The optional webhook (`watch.webhook_url`): drift alarms and gate decisions as JSON.

Why best effort: a chat channel or an incident tool that is down must not fail the refresh
or the training that had something to say; a failed POST costs one warning in the log.
Why no personal data: the receiver is outside the lake's access control, so a payload holds
ids of models and as_of dates, figures, feature labels and trigger names, never a customer.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0  # a slow receiver delays the job at most this long per event


def post_event(url: str, event: dict[str, Any]) -> bool:
    """POST one event as JSON to `url` (nothing when it is empty); True if it was accepted
    (2xx). Any failure is logged once as a warning and returns False."""
    if not url:
        return False
    body = json.dumps(event, default=str).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as answer:
            ok = 200 <= answer.status < 300
    except Exception as exc:  # any failure: the job goes on
        log.warning("webhook %s not delivered (%s): %s", event.get("event"), url, exc)
        return False
    if not ok:
        log.warning("webhook %s answered %s (%s)", event.get("event"), answer.status, url)
    return ok


def drift_event(model_name: str, alarms: dict[str, Any], psi_alarm: float) -> dict[str, Any]:
    """The drift alarm of one refresh (`drift.latest_alarms`)."""
    return {"event": "drift_alarm", "model_name": model_name, "psi_alarm": psi_alarm, **alarms}


def gate_event(summary, triggers: list[str] | None) -> dict[str, Any]:
    """The gate's decision on a trained version (`train`, or `retrain --if-needed` with the
    triggers that fired)."""
    return {
        "event": "gate_decision",
        "command": "retrain --if-needed" if triggers is not None else "train",
        "triggers": triggers or [],
        "model_name": summary.model_name,
        "ModelVersion": str(summary.model_version),
        "trained_as_of": summary.trained_as_of,
        "promoted": bool(summary.promoted),
        "gate_label": getattr(summary, "gate_label", None),
        "gate_reason": summary.gate_reason,
        "test_roc_auc": float(summary.roc_auc),
        "test_pr_auc": float(summary.pr_auc),
    }
