"""Write the service's OpenAPI schema to docs/openapi.json (the file tests/deployments/test_openapi_schema.py checks).

    python scripts/export_openapi.py
"""

from __future__ import annotations

import json
from pathlib import Path

from deployments.ingress import app

OUT = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"

if __name__ == "__main__":
    OUT.write_text(json.dumps(app.openapi(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
