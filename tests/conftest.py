"""Shared test set-up: quiet tokenizers, Ray without auth, torch on one thread."""

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
