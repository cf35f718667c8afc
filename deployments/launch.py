"""``make serve``'s launcher: ``serve run CONFIG`` with the embedded Redis started before it and stopped after it.

The embedded Redis (:class:`registry.connection.EmbeddedRedis`) is a daemon that every registry replica of
the service shares, so it must outlive any one replica; started by a replica it would also outlive the
service. This launcher owns it instead: it starts the daemon of each application that uses it (no
``registry.store.redis_url`` and no ``$REDIS_URL``) before Serve starts, runs ``serve run`` as a child in its
own session, and on Ctrl-C, SIGTERM or SIGHUP forwards one SIGINT (the shutdown ``serve run`` handles: it
shuts Serve and its local Ray cluster down), waits for it, then shuts the daemon down (saving first). A
daemon that was already running when the launcher started (a service still up on the same folder, or one
left by a killed run) is left running, with a note saying how to stop it.

    python -m deployments.launch serve_config.yaml
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import yaml

from registry.connection import EmbeddedRedis

from .config import AppConfig

APP_IMPORT_PATH = "deployments.app:build_app"
# Signals after the first escalate: SIGINT (graceful), then SIGTERM, then SIGKILL.
_ESCALATION = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def embedded_dirs(config_path: str) -> list[str]:
    """The embedded-Redis data folders the applications of a Serve config use (none when they have a URL)."""
    spec = yaml.safe_load(Path(config_path).read_text()) or {}
    folders: list[str] = []
    for app in spec.get("applications") or []:
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        store = AppConfig.model_validate(app.get("args") or {}).registry_config().store
        if store.resolved_url() is None and store.embedded_dir not in folders:
            folders.append(store.embedded_dir)
    return folders


class Launcher:
    """``serve run`` and the embedded Redis daemons it needs, stopped together."""

    def __init__(self, config_path: str, serve_bin: str | None = None) -> None:
        self.config_path = config_path
        self.serve_bin = serve_bin or str(Path(sys.executable).with_name("serve"))
        self.servers = [EmbeddedRedis(d) for d in embedded_dirs(config_path)]
        self.started: list[EmbeddedRedis] = []
        self.child: subprocess.Popen[bytes] | None = None
        self._signals = 0

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self.child is None:  # still starting Redis: stop here (the finally block stops what was started)
            raise KeyboardInterrupt
        if self.child.poll() is not None:
            return
        sig = _ESCALATION[min(self._signals, len(_ESCALATION) - 1)]
        self._signals += 1
        print(f"launcher: {signal.Signals(signum).name} received, sending {sig.name} to serve run", file=sys.stderr)
        self.child.send_signal(sig)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._forward)
        try:
            for server in self.servers:
                if server._ping():
                    print(f"launcher: the embedded Redis in {server.data_dir} was already running; it is left "
                          f"running after the service (stop it: hilora registry stop-embedded --dir "
                          f"{server.data_dir})", file=sys.stderr)
                    continue
                server.ensure_running()
                self.started.append(server)
            # Its own session: a Ctrl-C reaches the launcher alone, which forwards exactly one SIGINT.
            self.child = subprocess.Popen([self.serve_bin, "run", self.config_path], start_new_session=True)
            while True:
                try:
                    return self.child.wait()
                except InterruptedError:  # pragma: no cover - wait() retries EINTR itself since PEP 475
                    continue
        finally:
            if self.child is not None and self.child.poll() is None:  # the launcher itself failed
                self.child.kill()
                self.child.wait()
            for server in self.started:
                server.stop()
                print(f"launcher: stopped the embedded Redis in {server.data_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="serve_config.yaml", help="Serve config file")
    parser.add_argument("--serve-bin", default=None, help="the `serve` command (default: the one beside this Python)")
    args = parser.parse_args(argv)
    return Launcher(args.config, serve_bin=args.serve_bin).run()


if __name__ == "__main__":
    sys.exit(main())
