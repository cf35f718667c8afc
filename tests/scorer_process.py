"""A registry scorer in a fresh Python process, as a new replica would start: it routes saved query
embeddings and reports its decisions, scores, status and prefilter cells as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

SCORER_SCRIPT = """
import json, sys
import numpy as np
from registry.config import RegistryConfig
from registry.scorer import PoolScorer
from hilora_core.models.embedding import EmbedderIdentity
cfg = RegistryConfig(**json.loads(sys.argv[1]))
z = np.load(sys.argv[2])
ident = EmbedderIdentity("synthetic-test", None, z.shape[1], "", True)
scorer = PoolScorer(cfg, identity=ident, follow=False)
out = [d.to_dict() for d in scorer.route_embeddings(z)]
scores = scorer.snapshot.model.score(z)
index = scorer.snapshot.index
cells = None if index is None else index.centroids().tobytes().hex()
print(json.dumps({"decisions": out, "scores": scores.tolist(), "status": scorer.status(), "cells": cells}))
"""


def route_in_new_process(cfg, queries_path: Path) -> dict:
    """Route the (n, d) embeddings saved at ``queries_path`` (``np.save``) with a new scorer of ``cfg``
    (a :class:`registry.config.RegistryConfig`; embedder identity "synthetic-test")."""
    args = json.dumps(asdict(cfg))
    proc = subprocess.run([sys.executable, "-c", SCORER_SCRIPT, args, str(queries_path)],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
