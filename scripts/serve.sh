#!/usr/bin/env bash
# Run the service on its embedded defaults: `make serve` (after `make setup`).
# Handles the Ray gotchas of small machines: token auth off for local use, the base model
# converted once before Serve starts (so no replica waits ~30 s for it), fractional CPUs
# in serve_config.yaml. Stop with Ctrl-C (or SIGTERM when run in the background): the launcher
# (deployments/launch.py) shuts Serve and its Ray processes down, then the embedded Redis it started.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export TOKENIZERS_PARALLELISM=false
CONFIG="${1:-serve_config.yaml}"
.venv/bin/python -c "from hilora_core.models.base_model import resolve_base; print('base model:', resolve_base(None))"
if [ -z "${HILORA_ADMIN_TOKEN:-}" ]; then
    echo "note: HILORA_ADMIN_TOKEN is unset, so the admin API (/admin/...) is disabled" >&2
fi
exec .venv/bin/python -m deployments.launch "$CONFIG"
