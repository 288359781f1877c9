"""Metrics, evaluators, predictions files and inference."""
