"""Experiment configs (ml-collections). Importable so configs can share helpers."""
