"""``hilora_core.baselines``: the compared routing methods."""
