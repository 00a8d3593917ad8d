"""Runs in MLflow: logging a run's config and parent, reports over seeds, and reproducible studies."""
