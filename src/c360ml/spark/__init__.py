"""The Spark engine: the stage declarations run as Spark work, through Spark Connect
(`sc://host:port`: Databricks, Fabric, any Spark 3.5+/4 cluster, or Sail on one machine)
or the active classic SparkSession of a Spark job or notebook (Synapse Spark).

pyspark is imported here lazily, inside the functions that need it: the core package
never needs it (install the `spark` extra, or run where a cluster provides pyspark).
"""

from c360ml.spark.session import SparkUnavailableError, spark_session

__all__ = ["SparkUnavailableError", "spark_session"]
