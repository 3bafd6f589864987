"""c360ml: customer-retention machine learning on Customer 360 data."""

__version__ = "0.1.0"
