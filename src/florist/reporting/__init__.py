"""The run directory and what a person reads from it: metrics, plots, summaries."""
