"""Hydra configs of `python -m dcnlab` (the top-level conf/ folder, installed as dcnlab.conf)."""
