"""The MLflow pyfunc wrapper: loads the bundle folder it carries and calls `scoring.score`.

It holds no scoring logic of its own, so `mlflow.pyfunc.load_model(...).predict(frame)`
returns exactly what the batch refresh and the service return for the same frame.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc

from c360ml.model.scoring import DEFAULT_EXPLAIN, ModelBundle, score

BUNDLE_ARTIFACT = "bundle"  # key of the bundle folder in the pyfunc's artifacts


# MLflow warns, when the class is defined, that predict has no type hints; the schema
# check is ours (pandera, in scoring), so the warning is silenced for this definition only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")

    class ChurnModel(mlflow.pyfunc.PythonModel):
        """CustomerId + features in; CustomerId, ChurnScore, IsChurn, RiskLevel,
        InfluentialFactors out. Param `explain` = "exact" | "approx" | "none"."""

        bundle: ModelBundle | None = None

        def load_context(self, context) -> None:
            self.bundle = ModelBundle.load(Path(context.artifacts[BUNDLE_ARTIFACT]))

        def predict(self, context, model_input, params=None):
            explain = (params or {}).get("explain", DEFAULT_EXPLAIN)
            return score(self.bundle, model_input, explain=explain)
