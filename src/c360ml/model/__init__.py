"""Train, evaluate, register and score the churn model.

Import the submodules directly: `c360ml.model.scoring` (the one scoring function, light
enough for the service), `train` (fit and evaluate), `registry` (MLflow), `pipeline`
(`run_training`, which wires in the features module). Nothing heavy is imported here, so
`import c360ml.model.scoring` does not pull in mlflow or featuretools.
"""

from c360ml.model.spark_probe import import_spark_connect_safely

import_spark_connect_safely()  # before any MLflow call of this process (see the module)
