"""``hilora_core.routing`` and the policies: Gaussians, calibration, candidates, ROCs, token routing, the
off-pool test."""
