"""The Redis layout of an adapter pool, and its atomic writes.

Keys (``P`` = ``RegistryConfig.store.key_prefix``, wrapped in ``{}`` on a Redis Cluster: one slot per pool):

    P:adapter:<id>   hash  meta (JSON record), emb (float32 (m, d) row-major bytes),
                           texts (zlib JSON list, optional), epoch (int)
    P:ids            zset  every registered id, score 0 (lexicographic order, for paging)
    P:epoch          int   pool epoch, +1 on every change
    P:changelog      zset  the last ``changelog_max`` changes, score = epoch,
                           member = JSON {"epoch", "op", "id"}
    P:embedder       str   JSON identity of the pool's embedder (cleared when the pool empties)
    P:fit            hash  the pool-wide fit parameters and the epoch they were computed at
    P:reference:<h>  str   the off-pool reference set, embedded by embedder h
    P:fitted...      the fitted pool itself, for fast scorer start (:mod:`registry.fitted_pool`)

Every write is one Lua script, so it is atomic: the adapter hash, the id set, the epoch, the changelog entry and
the pub/sub message change together or not at all, and a reader never sees half an adapter. The message published
on ``RegistryConfig.store.channel`` is the changelog entry.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import redis
from redis.typing import EncodableT

from hilora_core.errors import InvalidInputError, UnknownAdapterError
from hilora_core.models.embedding import EmbedderIdentity
from hilora_core.routing.gaussian import GaussianBank
from hilora_core.routing.pool import PoolParameters

from .config import RegistryConfig
from .connection import REDIS_ERRORS, RedisClient, is_cluster, pool_key_prefix, reply_bytes, reply_text
from .errors import ConflictError, EmbedderMismatchError, RegistryUnavailableError
from .fitted_pool import FittedHeader, FittedPool, FittedPoolStore
from .fitting import StoredParameters
from .records import AdapterPage, AdapterRecord, StoredAdapter

T = TypeVar("T")

# KEYS: adapter, ids, epoch, changelog, embedder
# ARGV: id, mode (create | replace | update), channel, changelog_max, identity, meta, emb, texts
_PUT_SCRIPT = """
local exists = redis.call('EXISTS', KEYS[1])
if ARGV[2] == 'create' and exists == 1 then  -- this very write again (a retry after a failover): its success
  local cur = redis.call('HMGET', KEYS[1], 'meta', 'emb', 'epoch')
  if cur[1] == ARGV[6] and cur[2] == ARGV[7] then return tonumber(cur[3]) end
  return redis.error_reply('HILORA_CONFLICT')
end
if ARGV[2] == 'update' and exists == 0 then return redis.error_reply('HILORA_MISSING') end
local current = redis.call('GET', KEYS[5])
local count = redis.call('ZCARD', KEYS[2])
if current and current ~= ARGV[5] and count > 0 and not (count == 1 and exists == 1) then
  return redis.error_reply('HILORA_EMBEDDER ' .. current)
end
redis.call('SET', KEYS[5], ARGV[5])
local epoch = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'meta', ARGV[6], 'emb', ARGV[7], 'epoch', epoch)
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'texts', ARGV[8]) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local msg = cjson.encode({epoch = epoch, op = 'put', id = ARGV[1]})
redis.call('ZADD', KEYS[4], epoch, msg)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[4]) + 1))
redis.call('PUBLISH', ARGV[3], msg)
return epoch
"""

# KEYS: adapter, ids, epoch, changelog, embedder;  ARGV: id, channel, changelog_max
_REMOVE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('HILORA_MISSING') end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[5]) end
local epoch = redis.call('INCR', KEYS[3])
local msg = cjson.encode({epoch = epoch, op = 'remove', id = ARGV[1]})
redis.call('ZADD', KEYS[4], epoch, msg)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[3]) + 1))
redis.call('PUBLISH', ARGV[2], msg)
return epoch
"""


# KEYS: fit;  ARGV: epoch, key, params JSON. Newer parameters (or another key) replace older ones.
_PUT_FIT_SCRIPT = """
local e = redis.call('HGET', KEYS[1], 'epoch')
if e and tonumber(e) >= tonumber(ARGV[1]) and redis.call('HGET', KEYS[1], 'key') == ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'key', ARGV[2], 'params', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Change:
    """One changelog entry: ``op`` is "put" or "remove"."""

    epoch: int
    op: str
    id: str

    @classmethod
    def from_json(cls, raw: bytes | str) -> Change:
        d = json.loads(raw)
        return cls(int(d["epoch"]), str(d["op"]), str(d["id"]))


def encode_embeddings(z: np.ndarray) -> bytes:
    return np.ascontiguousarray(z, dtype="<f4").tobytes()


def decode_embeddings(raw: bytes, m: int, d: int) -> np.ndarray:
    z = np.frombuffer(raw, dtype="<f4")
    assert z.size == m * d, (z.size, m, d)
    return z.reshape(m, d).astype(np.float32)


def encode_texts(texts: Sequence[str]) -> bytes:
    return zlib.compress(json.dumps(list(texts), ensure_ascii=False).encode("utf-8"), 6)


def decode_texts(raw: bytes) -> list[str]:
    return json.loads(zlib.decompress(raw).decode("utf-8"))


def identity_key(identity: EmbedderIdentity) -> str:
    """One string per embedder identity (equal identities, equal keys)."""
    return json.dumps(identity.to_dict(), sort_keys=True)


class AdapterStore:
    """Reads and atomic writes of one pool's keys. Connection errors become
    :class:`RegistryUnavailableError`.

    Args:
        client: a redis-py client (bytes responses).
        config: for the key prefix, channel and changelog length.
    """

    def __init__(self, client: RedisClient, config: RegistryConfig) -> None:
        self.client = client
        self.config = config
        self.prefix = p = pool_key_prefix(config.store.key_prefix, is_cluster(client))
        if config.store.min_replica_acks and is_cluster(client):
            raise InvalidInputError("min_replica_acks (WAIT after each write) is supported with one primary or "
                                    "Sentinel, not on a Redis Cluster")
        self._ids_key, self._epoch_key = f"{p}:ids", f"{p}:epoch"
        self._changelog_key, self._embedder_key = f"{p}:changelog", f"{p}:embedder"
        self._fit_key = f"{p}:fit"
        self._put = client.register_script(_PUT_SCRIPT)
        self._put_fit = client.register_script(_PUT_FIT_SCRIPT)
        self._remove = client.register_script(_REMOVE_SCRIPT)
        self._fitted = FittedPoolStore(client, p)

    def adapter_key(self, adapter_id: str) -> str:
        return f"{self.prefix}:adapter:{adapter_id}"

    def _keys(self, adapter_id: str) -> list[str]:
        return [self.adapter_key(adapter_id), self._ids_key, self._epoch_key, self._changelog_key,
                self._embedder_key]

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except REDIS_ERRORS as exc:
            raise RegistryUnavailableError(f"Redis is unavailable ({what}): {exc}") from exc

    # ---- writes -------------------------------------------------------------------------------

    def _acknowledged_write(self, what: str, script, keys: list[str], args: list) -> int:
        """Run a write script; with ``min_replica_acks`` > 0, also wait (on the same connection, so
        WAIT covers this write) until that many replicas hold it.

        Raises RegistryUnavailableError when they do not within ``replica_ack_timeout_ms``: the
        primary applied the write, but a failover could lose it, so it is not acknowledged.
        """
        need = self.config.store.min_replica_acks
        if need == 0:
            return int(self._call(what, lambda: script(keys=keys, args=args)))

        def run() -> list:
            pipe = self.client.pipeline(transaction=False)
            script(keys=keys, args=args, client=pipe)
            pipe.wait(need, self.config.store.replica_ack_timeout_ms)
            return pipe.execute()

        epoch, acked = self._call(what, run)
        if int(acked) < need:
            raise RegistryUnavailableError(
                f"Redis is not safe to write ({what}): {acked} of the {need} replica(s) required acknowledged "
                f"the change within {self.config.store.replica_ack_timeout_ms} ms; it may be lost on a failover, retry"
            )
        return int(epoch)

    def put(self, record: AdapterRecord, embeddings: np.ndarray, texts: Sequence[str] | None, mode: str) -> int:
        """Write an adapter atomically; returns the new pool epoch.

        ``mode``: "create" (fails with ConflictError if the id exists), "replace", or
        "update" (fails with UnknownAdapterError if it does not).
        """
        assert mode in ("create", "replace", "update"), mode
        z = np.asarray(embeddings, dtype=np.float32)
        assert z.shape == (record.sample_count, record.embedder.dim), (z.shape, record.sample_count)
        meta = json.dumps(record.to_dict(), sort_keys=True)
        args = [record.id, mode, self.config.store.channel, self.config.store.changelog_max,
                identity_key(record.embedder), meta, encode_embeddings(z),
                encode_texts(texts) if texts is not None else b""]
        try:
            return self._acknowledged_write("register", self._put, self._keys(record.id), args)
        except redis.ResponseError as exc:
            msg = str(exc)
            if "HILORA_CONFLICT" in msg:
                raise ConflictError(f"adapter {record.id!r} is already registered (pass replace=True)") from None
            if "HILORA_MISSING" in msg:
                raise UnknownAdapterError(f"adapter {record.id!r} is not registered") from None
            if "HILORA_EMBEDDER" in msg:
                pool = msg.split("HILORA_EMBEDDER", 1)[1].strip()
                raise EmbedderMismatchError(
                    f"adapter {record.id!r} was embedded with {record.embedder.to_dict()} but the pool uses {pool}"
                ) from None
            raise

    def remove(self, adapter_id: str) -> int:
        """Delete an adapter atomically; returns the new pool epoch."""
        args = [adapter_id, self.config.store.channel, self.config.store.changelog_max]
        try:
            return self._acknowledged_write("remove", self._remove, self._keys(adapter_id), args)
        except redis.ResponseError as exc:
            if "HILORA_MISSING" in str(exc):
                raise UnknownAdapterError(f"adapter {adapter_id!r} is not registered") from None
            raise

    # ---- reads --------------------------------------------------------------------------------

    def epoch(self) -> int:
        raw = self._call("read epoch", lambda: self.client.get(self._epoch_key))
        return int(raw) if raw is not None else 0

    def count(self) -> int:
        return int(self._call("count", lambda: self.client.zcard(self._ids_key)))

    # ---- the pool parameters of the last full fit, shared by every scorer ----

    def get_parameters(self) -> StoredParameters | None:
        """The stored pool parameters, or None."""
        raw = self._call("read fit", lambda: self.client.hmget(self._fit_key, "epoch", "key", "params"))
        if raw[0] is None or raw[2] is None:
            return None
        return StoredParameters(int(reply_bytes(raw[0])), reply_text(raw[1]),
                                PoolParameters.from_dict(json.loads(reply_bytes(raw[2]))))

    def put_parameters(self, stored: StoredParameters) -> bool:
        """Store parameters unless ones at least as new, under the same key, are stored; True if written."""
        args: list[EncodableT] = [stored.epoch, stored.key, json.dumps(stored.params.to_dict(), sort_keys=True)]
        return bool(self._call("write fit", lambda: self._put_fit(keys=[self._fit_key], args=args)))

    # ---- the fitted pool (Gaussians, raw means, records), so new scorers start without fitting ----

    def fitted_header(self) -> FittedHeader | None:
        return self._call("read fitted pool header", self._fitted.header)

    def get_fitted(self) -> FittedPool | None:
        """The stored fitted pool, or None (none stored, or replaced while it was read)."""
        return self._call("read fitted pool", self._fitted.read)

    def put_fitted(self, header: FittedHeader, ids: list[str], records: list[AdapterRecord], bank: GaussianBank,
                   raw_means: np.ndarray, centroids: np.ndarray | None = None) -> bool:
        """Store a fitted pool (see :meth:`FittedPoolStore.write`); True if stored."""
        return self._call("write fitted pool",
                          lambda: self._fitted.write(header, ids, records, bank, raw_means, centroids))

    # ---- the off-pool reference set, embedded once per embedder and shared by every scorer ----

    def _reference_key(self, identity: EmbedderIdentity) -> str:
        digest = hashlib.sha1(identity_key(identity).encode()).hexdigest()[:16]
        return f"{self.prefix}:reference:{digest}"

    def get_reference(self, identity: EmbedderIdentity) -> np.ndarray | None:
        """The (R, d) reference embeddings stored for ``identity``, or None."""
        raw = self._call("read reference", lambda: self.client.get(self._reference_key(identity)))
        if raw is None:
            return None
        z = np.frombuffer(reply_bytes(raw), dtype="<f4")
        return z.reshape(-1, identity.dim).astype(np.float32) if z.size % identity.dim == 0 else None

    def put_reference(self, identity: EmbedderIdentity, z: np.ndarray) -> np.ndarray:
        """Store (R, d) reference embeddings unless some scorer already did; returns the stored ones."""
        self._call("write reference", lambda: self.client.set(self._reference_key(identity), encode_embeddings(z),
                                                              nx=True))
        stored = self.get_reference(identity)
        return stored if stored is not None else np.asarray(z, dtype=np.float32)

    @staticmethod
    def _record(meta: object, epoch: object) -> AdapterRecord:
        """The record from its stored ``meta`` JSON and ``epoch`` replies (epoch None: not stored)."""
        rec = AdapterRecord.from_dict(json.loads(reply_bytes(meta)))
        return rec.with_epoch(int(reply_bytes(epoch))) if epoch is not None else rec

    def get_record(self, adapter_id: str) -> AdapterRecord | None:
        meta, epoch = self._call("get", lambda: self.client.hmget(self.adapter_key(adapter_id), "meta", "epoch"))
        return None if meta is None else self._record(meta, epoch)

    def get(self, adapter_id: str) -> StoredAdapter | None:
        """The record with its embeddings (one atomic HMGET), or None."""
        return self.fetch([adapter_id]).get(adapter_id)

    def get_texts(self, adapter_id: str) -> list[str] | None:
        raw = self._call("get texts", lambda: self.client.hget(self.adapter_key(adapter_id), "texts"))
        return None if raw is None else decode_texts(reply_bytes(raw))

    def fetch(self, ids: Sequence[str], chunk: int = 500) -> dict[str, StoredAdapter]:
        """Records and embeddings of ``ids`` (missing ids are left out). Each adapter is read
        atomically; the set as a whole is not a snapshot (see :meth:`snapshot_ids`)."""
        out: dict[str, StoredAdapter] = {}
        for start in range(0, len(ids), chunk):
            part = list(ids[start:start + chunk])

            def read(part: list[str] = part) -> list:
                pipe = self.client.pipeline(transaction=False)
                for adapter_id in part:
                    pipe.hmget(self.adapter_key(adapter_id), "meta", "emb", "epoch")
                return pipe.execute()

            for adapter_id, (meta, emb, epoch) in zip(part, self._call("fetch", read), strict=True):
                if meta is None:
                    continue
                rec = self._record(meta, epoch)
                out[adapter_id] = StoredAdapter(rec, decode_embeddings(emb, rec.sample_count, rec.embedder.dim))
        return out

    def list_page(self, offset: int, limit: int) -> AdapterPage:
        """Records (no embeddings) in id order, ``offset``..``offset + limit``."""

        def read() -> tuple[int, list[bytes], list]:
            total = self.client.zcard(self._ids_key)
            ids = [reply_bytes(i) for i in self.client.zrange(self._ids_key, offset, offset + limit - 1)] \
                if limit > 0 else []
            pipe = self.client.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hmget(self.adapter_key(raw_id.decode()), "meta", "epoch")
            return total, ids, pipe.execute() if ids else []

        total, ids, rows = self._call("list", read)
        records = [self._record(meta, epoch) for meta, epoch in rows if meta is not None]
        end = offset + len(ids)
        return AdapterPage(records=records, total=int(total), next_offset=end if end < total else None)

    def iter_records(self, page_size: int = 500) -> Iterator[AdapterRecord]:
        offset: int | None = 0
        while offset is not None:
            page = self.list_page(offset, page_size)
            yield from page.records
            offset = page.next_offset

    def snapshot_ids(self) -> tuple[int, list[str]]:
        """(epoch, all ids) read together in one MULTI/EXEC."""

        def read() -> list:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self._epoch_key)
            pipe.zrange(self._ids_key, 0, -1)
            return pipe.execute()

        epoch, ids = self._call("snapshot", read)
        return (int(epoch) if epoch is not None else 0), [i.decode() for i in ids]

    def changes_since(self, epoch: int) -> tuple[list[Change], bool]:
        """Changes with epoch > ``epoch`` in order, and whether the log is complete since then
        (False when older entries were trimmed away or the store's epoch went backwards)."""

        def read() -> list:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self._epoch_key)
            pipe.zrange(self._changelog_key, 0, 0, withscores=True)
            pipe.zrangebyscore(self._changelog_key, f"({epoch}", "+inf")
            return pipe.execute()

        current, first, entries = self._call("read changelog", lambda: read())
        current = int(current) if current is not None else 0
        changes = [Change.from_json(e) for e in entries]
        if current < epoch:
            return changes, False
        if current == epoch:
            return [], True
        oldest = int(first[0][1]) if first else current + 1
        complete = oldest <= epoch + 1 and (not changes or changes[-1].epoch == current)
        return changes, complete

    def pubsub(self) -> redis.client.PubSub:
        ps = self.client.pubsub(ignore_subscribe_messages=True)
        self._call("subscribe", lambda: ps.subscribe(self.config.store.channel))
        return ps
