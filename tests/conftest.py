"""Shared test set-up: quiet, single-threaded-ish torch, and the shared fixtures."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
