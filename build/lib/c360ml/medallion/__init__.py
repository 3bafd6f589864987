"""Medallion stages: landing -> bronze -> silver -> gold."""
