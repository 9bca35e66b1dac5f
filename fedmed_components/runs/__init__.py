"""Runs built on the core and the FLARE layer: the demo and the paper's experiment
(config, data preparation, run kinds, scoring, reports)."""
