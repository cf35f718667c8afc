"""``hilora_core.engine``: the routed model, its adapter cache, token choice and the generation loop."""
