"""The ``hilora registry`` commands leave nothing running: without a Redis URL they start the embedded Redis
and stop it again, unless it was running before (a service's); ``stop-embedded`` shuts one down."""

from __future__ import annotations

import json

from registry.cli import main
from registry.connection import EmbeddedRedis


def test_commands_stop_the_embedded_redis_they_started(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis("var/redis")  # the commands' default folder, under the working directory
    try:
        assert main(["registry", "list", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert not server._ping()
        server.ensure_running()  # as a running service's
        assert main(["registry", "list", "--json"]) == 0 and server._ping()
        capsys.readouterr()
        assert main(["registry", "stop-embedded"]) == 0 and not server._ping()
        assert "stopped the embedded Redis" in capsys.readouterr().out
        assert main(["registry", "stop-embedded"]) == 0 and "no embedded Redis" in capsys.readouterr().out
    finally:
        server.stop()
