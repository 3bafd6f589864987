"""c360ml: customer-retention machine learning on Customer 360 data.

From Python (a notebook), start with `c360ml.open()`: a `Project` with the lake's tables,
the training data `c360ml train` uses, `evaluate` for any scikit-learn-compatible
estimator, `register` through the champion gate and `score` (see `c360ml.api`). The names
are loaded on first use, so `import c360ml` stays free of I/O and heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from c360ml.api import Evaluation, Project, open  # noqa: A004
    from c360ml.model.train import TrainConfig

_PUBLIC = {
    "open": "c360ml.api",
    "Project": "c360ml.api",
    "Evaluation": "c360ml.api",
    "TrainConfig": "c360ml.model.train",
}
__all__ = ["Evaluation", "Project", "TrainConfig", "__version__", "open"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'c360ml' has no attribute {name!r}")
