"""Readers for the RES dataset layouts, records, the synthetic set and the Grain pipeline."""
