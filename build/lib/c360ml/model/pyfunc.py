"""The MLflow pyfunc wrapper: loads the bundle folder it carries and calls `scoring.score`.

It holds no scoring logic of its own, so `mlflow.pyfunc.load_model(...).predict(frame)`
returns exactly what the batch refresh and the service return for the same frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from c360ml.model.scoring import DEFAULT_EXPLAIN, ModelBundle, score

BUNDLE_ARTIFACT = "bundle"  # key of the bundle folder in the pyfunc's artifacts


class ChurnModel(mlflow.pyfunc.PythonModel):
    """CustomerId + features in; CustomerId, ChurnScore, IsChurn, RiskLevel,
    InfluentialFactors out. Param `explain` = "exact" | "approx" | "none".

    The DataFrame type hint tells MLflow to take the schema from the logged signature
    (type hints of that kind carry none); the request schema proper is pandera's, in scoring.
    """

    bundle: ModelBundle | None = None

    def load_context(self, context: Any) -> None:
        self.bundle = ModelBundle.load(Path(context.artifacts[BUNDLE_ARTIFACT]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        explain = (params or {}).get("explain", DEFAULT_EXPLAIN)
        return score(self.bundle, model_input, explain=explain)
