"""The Embedder replica's bulk path, outside Serve: a call of more than max_batch_size texts (a registration's
samples) is encoded in one call on the bulk thread, with its own torch thread count, and gives the rows the
request path gives (its serve.batch needs a Serve replica: through Serve, the batch registration tests of
tests/deployments cover both paths)."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from deployments.embedder import EmbedderReplica, usable_cpus


def _texts(n: int) -> list[str]:
    return [f"Sample {i}: {'translate this sentence into French' if i % 2 else 'add these two numbers'}"
            + " please" * (i % 7) for i in range(n)]


def test_bulk_and_request_paths_embed_alike_and_bulk_uses_its_threads():
    replica = EmbedderReplica({"embedder": {"max_batch_size": 8, "bulk_threads": 2}})
    texts = _texts(21)  # lengths vary, so the bulk call's length sort reorders them

    bulk = asyncio.run(replica.embed(texts))  # 21 > 8: one call on the bulk thread
    batched = np.concatenate([replica.embedder.encode(texts[i: i + 7]) for i in range(0, 21, 7)])  # as serve.batch
    assert bulk.shape == (21, replica.embedder.dim) and bulk.dtype == np.float32
    np.testing.assert_allclose(bulk, batched, atol=1e-5)  # same rows, in the caller's order
    assert not np.allclose(bulk[0], bulk[1])
    assert replica._bulk.submit(torch.get_num_threads).result() == 2


def test_bulk_threads_default_to_the_usable_cpus():
    replica = EmbedderReplica({})
    assert replica.bulk_threads == usable_cpus() >= 1
    assert replica._bulk.submit(torch.get_num_threads).result() == usable_cpus()
