"""Pretraining: typed TOML configs, the WSD schedule, atomic checkpoints, metrics and the trainer."""
