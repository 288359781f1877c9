"""Eval configs: one file per benchmark (scripts/eval.py --config configs/eval/<bench>.py)."""
