"""``hilora_core.evaluation``: the evaluation harness."""
