"""The fitted pool stored in Redis, so a new scorer starts without fitting anything.

A scorer that has fitted the pool writes its Gaussians (the bank's arrays), the raw mean
embeddings and the adapter records, at the epoch they reflect. A new replica reads them
back with a few large reads, then replays the changelog since that epoch: start-up costs
a copy of the arrays instead of one SVD per adapter.

Keys (``P`` = ``RegistryConfig.store.key_prefix``):

    P:fitted                     hash  epoch, key (fit settings + reference set), digest (pool
                                       parameters), token, n, k, d, dtype, chunk, chunks,
                                       ids and records (zlib JSON), centroids (the
                                       prefilter's IVF cell centres, float32, optional)
    P:fitted:<token>:<c>         hash  chunk c: means, bases, variances, eps, n_samples,
                                       raw_means (little-endian array bytes)
    P:fitted:lock                str   held by the one scorer writing (expires)

The arrays go in chunks of at most ``CHUNK_BYTES`` so that no Redis value approaches the
512 MB bulk limit. A write stores the chunks under a fresh token, then swaps the header with
a compare-and-set script (a newer epoch, or another fit key, replaces the stored one) and
lets the replaced chunks expire after ``STALE_TTL_S``, so a reader in progress can finish.
"""

from __future__ import annotations

import json
import secrets
import zlib
from dataclasses import dataclass

import numpy as np
from redis.typing import EncodableT

from hilora_core.routing.gaussian import GaussianBank

from .connection import RedisClient, reply_bytes, reply_text
from .records import AdapterRecord

CHUNK_BYTES = 64 << 20
STALE_TTL_S = 120
LOCK_TTL_S = 600

# KEYS: header;  ARGV: epoch, key, digest, then field/value pairs of the new header.
# Returns the replaced header's token and chunk count, "" when nothing was stored, or 0 when refused.
_SWAP_SCRIPT = """
local e = redis.call('HGET', KEYS[1], 'epoch')
local k = redis.call('HGET', KEYS[1], 'key')
local g = redis.call('HGET', KEYS[1], 'digest')
if e and tonumber(e) >= tonumber(ARGV[1]) and k == ARGV[2] and g == ARGV[3] then return 0 end
local old = ''
if e then old = redis.call('HGET', KEYS[1], 'token') .. ' ' .. redis.call('HGET', KEYS[1], 'chunks') end
redis.call('DEL', KEYS[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return old
"""

# KEYS: lock;  ARGV: token. Deletes the lock only if this writer holds it.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_ARRAYS = ("means", "bases", "variances", "eps", "n_samples", "raw_means")


@dataclass(frozen=True)
class FittedHeader:
    """What a stored fit was computed from: pool ``epoch``, fit ``key``, parameter ``digest``."""

    epoch: int
    key: str
    digest: str


@dataclass(frozen=True)
class FittedPool:
    """A fitted pool: adapters ``ids`` (sorted) with their ``records``, ``bank`` and (I, d)
    float64 ``raw_means``, reflecting every change up to ``header.epoch``; ``centroids``: (nlist, d)
    IVF cell centres of the writer's prefilter index, if it had one."""

    header: FittedHeader
    ids: list[str]
    records: list[AdapterRecord]
    bank: GaussianBank
    raw_means: np.ndarray
    centroids: np.ndarray | None = None


def _pack(items: list) -> bytes:
    return zlib.compress(json.dumps(items, separators=(",", ":")).encode("utf-8"), 1)


def _unpack(raw: bytes) -> list:
    return json.loads(zlib.decompress(raw).decode("utf-8"))


class FittedPoolStore:
    """Reads and writes the stored fit of one pool (see the module docstring).

    Args:
        client: a redis-py client (bytes responses).
        prefix: the pool's key prefix.
    """

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.header_key, self.lock_key = f"{prefix}:fitted", f"{prefix}:fitted:lock"
        self._prefix = prefix
        self._swap = client.register_script(_SWAP_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)

    def _chunk_key(self, token: str, c: int) -> str:
        return f"{self._prefix}:fitted:{token}:{c}"

    def header(self) -> FittedHeader | None:
        raw = self.client.hmget(self.header_key, "epoch", "key", "digest")
        if raw[0] is None:
            return None
        return FittedHeader(int(reply_bytes(raw[0])), reply_text(raw[1]), reply_text(raw[2]))

    def write(self, header: FittedHeader, ids: list[str], records: list[AdapterRecord], bank: GaussianBank,
              raw_means: np.ndarray, centroids: np.ndarray | None = None) -> bool:
        """Store a fit unless another writer holds the lock or a newer one is stored; True if stored."""
        token = secrets.token_hex(8)
        if not self.client.set(self.lock_key, token, nx=True, ex=LOCK_TTL_S):
            return False
        try:
            n, k, d = bank.bases.shape
            arrays = dict(zip(_ARRAYS, (bank.means, bank.bases, bank.variances, bank.eps, bank.n_samples, raw_means),
                              strict=True))
            chunk = max(1, CHUNK_BYTES // sum(a[0].nbytes for a in arrays.values()))  # adapters per chunk
            starts = range(0, n, chunk)
            for c, start in enumerate(starts):
                part: dict[EncodableT, EncodableT] = {
                    name: np.ascontiguousarray(a[start:start + chunk]).tobytes() for name, a in arrays.items()}
                self.client.hset(self._chunk_key(token, c), mapping=part)
            fields: dict[str, EncodableT] = {
                "token": token, "n": n, "k": k, "d": d, "dtype": bank.dtype.str, "chunk": chunk,
                "chunks": len(starts), "ids": _pack(ids), "records": _pack([r.to_dict() for r in records]),
            }
            if centroids is not None:
                fields["centroids"] = np.ascontiguousarray(centroids, dtype="<f4").tobytes()
            flat = [x for kv in fields.items() for x in kv]
            old = self._swap(keys=[self.header_key],
                             args=[header.epoch, header.key, header.digest, "epoch", header.epoch, "key", header.key,
                                   "digest", header.digest, *flat])
            if old == 0:
                self._expire(token, len(starts), 0)
                return False
            if old:
                old_token, old_chunks = reply_text(old).split()
                self._expire(old_token, int(old_chunks), STALE_TTL_S)
            return True
        finally:
            self._release(keys=[self.lock_key], args=[token])

    def _expire(self, token: str, chunks: int, ttl_s: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for c in range(chunks):
            if ttl_s:
                pipe.expire(self._chunk_key(token, c), ttl_s)
            else:
                pipe.delete(self._chunk_key(token, c))
        pipe.execute()

    def read(self) -> FittedPool | None:
        """The stored fit, or None when there is none or its chunks expired meanwhile."""
        stored = self.client.hgetall(self.header_key)
        if not stored:
            return None
        h = {reply_text(key): reply_bytes(value) for key, value in stored.items()}
        n, k, d, chunk, chunks = (int(h[x]) for x in ("n", "k", "d", "chunk", "chunks"))
        dtype = np.dtype(h["dtype"].decode())
        out = {
            "means": np.empty((n, d), dtype), "bases": np.empty((n, k, d), dtype),
            "variances": np.empty((n, k), "<f8"), "eps": np.empty(n, "<f8"), "n_samples": np.empty(n, "<i8"),
            "raw_means": np.empty((n, d), "<f8"),
        }
        token = h["token"].decode()
        for c in range(chunks):
            raw = self.client.hmget(self._chunk_key(token, c), *_ARRAYS)
            if any(r is None for r in raw):
                return None
            for name, data in zip(_ARRAYS, raw, strict=True):
                a = out[name]
                part = np.frombuffer(reply_bytes(data), dtype=a.dtype).reshape(-1, *a.shape[1:])
                a[c * chunk:c * chunk + len(part)] = part
        ids = _unpack(h["ids"])
        records = [AdapterRecord.from_dict(r) for r in _unpack(h["records"])]
        if len(ids) != n or len(records) != n:
            return None
        bank = GaussianBank.from_arrays(out["means"], out["bases"], out["variances"], out["eps"], out["n_samples"])
        header = FittedHeader(int(h["epoch"]), h["key"].decode(), h["digest"].decode())
        centroids = None
        if "centroids" in h:
            centroids = np.frombuffer(h["centroids"], dtype="<f4").reshape(-1, d).copy()
        return FittedPool(header, ids, records, bank, out["raw_means"], centroids)
