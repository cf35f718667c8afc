"""Shared test set-up: quiet tokenizers, Ray without auth, torch on one thread, a Redis per module."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Torch on one thread for the whole session: two threads on a shared 2-core machine run the
    small models here several times slower once another job (Ray, Redis) is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory, request):
    """A real redis-server (no persistence) on a free loopback port for one test module; its URL."""
    from registry.redis_server import RedisServer

    srv = RedisServer(tmp_path_factory.mktemp(f"redis-{request.module.__name__}"), persistence="none").start()
    yield srv.url
    srv.stop()
