"""Flax modules: image encoders, ROI Align, vision flow, LLM, mask decoder and the assembled model."""
