"""Synthetic Dynamics 365 Commerce + Dataverse lake with a known churn process (and its oracle).

Never imported by pipeline code: tests and benchmarks use it to build landing data whose
best possible churn score is known. Entry points: `generate_lake` (initial full export),
`generate_increment` (the next weekly sync), `oracle.oracle_purchase_probability`.
"""

from c360ml.synth.generate import (
    LAKE_VERSION,
    GenerateSummary,
    generate_increment,
    generate_lake,
)

__all__ = ["LAKE_VERSION", "GenerateSummary", "generate_increment", "generate_lake"]
