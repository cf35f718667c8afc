"""``make serve``'s launcher leaves nothing running: it starts the embedded Redis before ``serve run``, forwards
Ctrl-C / SIGTERM to it as one SIGINT, and stops the Redis it started once ``serve run`` has exited. ``serve run``
is stood in for by a small script that waits for SIGINT (the real one is checked by hand: README, "Stopping")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from registry.connection import EmbeddedRedis

FAKE_SERVE = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[0]).with_suffix(".out")
def stop(signum, frame):
    out.write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
pathlib.Path(sys.argv[0]).with_suffix(".ready").write_text(" ".join(sys.argv[1:]))
while True:
    time.sleep(0.05)
"""


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    redis_dir = tmp_path / "redis"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "hilora", "import_path": "deployments.app:build_app",
        "args": {"registry": {"store": {"embedded_dir": str(redis_dir)}, "seed_manifest": None}}}]}))
    fake = tmp_path / "serve.py"
    fake.write_text(FAKE_SERVE)
    serve_bin = tmp_path / "serve"
    serve_bin.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    serve_bin.chmod(0o755)
    server = EmbeddedRedis(str(redis_dir))
    yield config, serve_bin, fake, server
    server.stop()


def _launch(config: Path, serve_bin: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deployments.launch", str(config), "--serve-bin", str(serve_bin)],
                            stderr=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items()
                                                                     if k != "REDIS_URL"})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_embedded_redis_stops_with_the_service(setup, sig):
    config, serve_bin, fake, server = setup
    launcher = _launch(config, serve_bin)
    _wait(lambda: fake.with_suffix(".ready").exists(), 60, "serve run to start")
    assert fake.with_suffix(".ready").read_text() == f"run {config}"
    assert server._ping()  # started before serve run
    launcher.send_signal(sig)
    assert launcher.wait(timeout=60) == 0, launcher.stderr.read()
    assert fake.with_suffix(".out").read_text() == "SIGINT"  # serve run shuts down on SIGINT, whatever came
    assert not server._ping()
    assert "stopped the embedded Redis" in launcher.stderr.read()
    left = subprocess.run(["pgrep", "-f", server.socket_path], capture_output=True, text=True).stdout
    assert not left.strip(), f"left running: {left}"


def test_a_redis_running_before_is_left_running(setup):
    config, serve_bin, fake, server = setup
    server.ensure_running()
    launcher = _launch(config, serve_bin)
    _wait(lambda: fake.with_suffix(".ready").exists(), 60, "serve run to start")
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == 0
    assert server._ping() and "already running" in launcher.stderr.read()
