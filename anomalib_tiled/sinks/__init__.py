"""Sinks of merged predictions: metrics, output files and result pictures."""
