"""``hilora_core.models``: base model and embedder helpers."""
