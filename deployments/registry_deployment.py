"""Registry deployment: the sequence-level router and the admin operations, backed by Redis.

Every replica follows the store by pub/sub (``registry.PoolScorer``), so an
adapter registered through any replica is routable on all of them within
about a second. Decisions carry the adapters' sources so model replicas can
load the weights on demand.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from pathlib import Path

import numpy as np
from ray import serve

from hilora_core.models.embedding import EmbedderIdentity
from hilora_core.plan import RoutingPlan
from hilora_core.policies import PolicyConfig
from registry.errors import ConflictError
from registry.manifest import import_manifest
from registry.pool_map import PoolMap, fit_pool_map
from registry.registry import Registry
from registry.routing import PoolSnapshot

from .config import AppConfig
from .contracts import AdapterLocation, Decision

log = logging.getLogger("ray.serve")


class RegistryReplica:
    """A registry replica (the plain class; :data:`RegistryService` is its Serve deployment).

    Args:
        config: the application config (``AppConfig`` as a dict).
        registry: the :class:`Registry` to serve (default: built from ``config``; tests pass their own).
    """

    def __init__(self, config: dict, registry: Registry | None = None) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.registry = registry if registry is not None else Registry(self.cfg.registry_config())
        self._map: tuple[int, PoolMap | None] | None = None  # (epoch, map) for the playground
        self._seed_pool()

    def _seed_pool(self) -> None:
        manifest = self.cfg.seed_manifest_path()
        if manifest is None or self.registry.count() > 0:
            return
        if not manifest.is_file():
            log.warning("seed manifest %s not found; starting with an empty pool", manifest)
            return
        pattern = str(Path(manifest).parent / "adapters" / "{model_name}")
        report = import_manifest(self.registry, str(manifest), pattern, skip_existing=True)
        log.info("seeded the pool from %s: %s", manifest, report.to_dict())

    # ---- routing ---------------------------------------------------------------------------

    def _sources(self, names) -> dict[str, AdapterLocation]:
        records = self.registry.scorer.snapshot.records
        out = {}
        for name in names:
            rec = records.get(name) or self.registry.get(name)
            out[name] = AdapterLocation(location=rec.source.location, revision=rec.source.revision)
        return out

    async def route(self, embeddings: np.ndarray, policy: dict) -> list[Decision]:
        """(n, d) request embeddings -> one :class:`Decision` per request (plan, candidates, scores, sources)."""
        cfg = PolicyConfig(**policy)
        decisions = await asyncio.to_thread(self.registry.route_embeddings, np.asarray(embeddings), cfg)
        return [d.model_copy(update={"sources": self._sources(d.plan.adapters)}) for d in decisions]

    def explicit(self, adapter_id: str) -> Decision:
        """The plain-LoRA decision for one named adapter (UnknownAdapterError if not registered)."""
        rec = self.registry.get(adapter_id)
        return Decision(plan=RoutingPlan.single(rec.id), candidates=(rec.id,), epoch=self.registry.epoch(),
                        degraded=self.registry.scorer.degraded, sources=self._sources([rec.id]))

    # ---- admin -----------------------------------------------------------------------------

    def register(self, body: dict, embeddings: np.ndarray, identity: dict) -> dict:
        rec = self.registry.register_embeddings(
            body["id"], body["source"], embeddings, texts=body["samples"], revision=body.get("revision"),
            rank=body.get("rank"), alpha=body.get("alpha"), targets=body.get("targets"),
            replace=bool(body.get("replace")), identity=EmbedderIdentity.from_dict(identity),
            tags=body.get("tags") or (),
        )
        self.registry.scorer.ensure_epoch(self.registry.epoch())
        return rec.to_dict()

    def register_many(self, bodies: builtins.list[dict], embeddings: np.ndarray, identity: dict) -> dict:
        """Register each body with its rows of ``embeddings`` (in order), then catch the pool up once.
        ``{"created": [records], "errors": [{"id", "status", "message"}]}``: one failure does not stop the others."""
        from .errors import message_of, status_for

        created, errors, start = [], [], 0
        who = EmbedderIdentity.from_dict(identity)
        for body in bodies:
            z = embeddings[start: start + len(body["samples"])]
            start += len(body["samples"])
            try:
                rec = self.registry.register_embeddings(
                    body["id"], body["source"], z, texts=body["samples"], revision=body.get("revision"),
                    rank=body.get("rank"), alpha=body.get("alpha"), targets=body.get("targets"),
                    replace=bool(body.get("replace")), identity=who, tags=body.get("tags") or ())
            except Exception as err:  # noqa: BLE001 - reported per adapter; an unexpected type is re-raised
                status = status_for(err)
                if status is None:
                    raise
                errors.append({"id": body["id"], "status": status, "message": message_of(err)})
                continue
            created.append(rec.to_dict())
        self.registry.scorer.ensure_epoch(self.registry.epoch())
        return {"created": created, "errors": errors}

    def check_free(self, adapter_id: str, replace: bool) -> None:
        """Raise ConflictError before the (costly) embedding of samples when the id is taken."""
        if not replace and adapter_id in self.registry.scorer.snapshot.records:
            raise ConflictError(f"adapter {adapter_id!r} is already registered; pass replace=true to overwrite")

    def get(self, adapter_id: str) -> dict:
        return self.registry.get(adapter_id).to_dict()

    def list(self, offset: int = 0, limit: int = 100) -> dict:
        page = self.registry.list(offset=offset, limit=limit)
        return {"adapters": [r.to_dict() for r in page.records], "total": page.total, "next_offset": page.next_offset}

    def remove(self, adapter_id: str) -> dict:
        epoch = self.registry.remove(adapter_id)
        self.registry.scorer.ensure_epoch(epoch)
        return {"id": adapter_id, "deleted": True, "epoch": epoch}

    def status(self) -> dict:
        return self.registry.scorer.status()

    # ---- the pool as a picture (the playground) ---------------------------------------------------

    def _pool_map(self) -> tuple[PoolSnapshot, PoolMap | None]:
        """The current snapshot and its map, refitted when the pool's epoch moves."""
        snap = self.registry.scorer.snapshot
        if self._map is None or self._map[0] != snap.epoch:
            fitted = fit_pool_map(snap.model.means) if snap.model is not None and len(snap.ids) else None
            self._map = (snap.epoch, fitted)
        return snap, self._map[1]

    def pool_view(self, limit: int = 50, offset: int = 0, q: str | None = None, tag: str | None = None) -> dict:
        """One page of the pool as the playground shows it, plus the whole map and the pool's state.

        ``adapters``: the ``limit`` adapters from ``offset`` (by id) among those matching ``q`` (a substring of the
        id, any case) and ``tag``, with their tags, rank, targets, sample count and map place; ``matching``
        and ``next_offset`` page through them. ``points``: every adapter as [id, x, y, first tag or None]
        (the map); ``tags``: each tag's adapter count."""
        snap, pmap = self._pool_map()
        xy = pmap.project(snap.model.means) if pmap is not None and snap.model is not None else np.zeros((0, 2))
        needle = (q or "").lower()
        rows = [i for i, name in enumerate(snap.ids)
                if needle in name.lower() and (tag is None or tag in snap.records[name].tags)]
        page = rows[offset: offset + limit]
        adapters = []
        for i in page:
            rec = snap.records[snap.ids[i]]
            adapters.append({"id": rec.id, "tags": list(rec.tags), "rank": rec.rank, "targets": list(rec.targets),
                             "sample_count": rec.sample_count, "x": float(xy[i, 0]), "y": float(xy[i, 1])})
        tags: dict[str, int] = {}
        for name in snap.ids:
            for t in snap.records[name].tags:
                tags[t] = tags.get(t, 0) + 1
        points = [[name, round(float(xy[i, 0]), 4), round(float(xy[i, 1]), 4),
                   snap.records[name].tags[0] if snap.records[name].tags else None] for i, name in enumerate(snap.ids)]
        status = self.status()
        return {"epoch": snap.epoch, "degraded": status["degraded"], "error": status["error"],
                "total": len(snap.ids), "matching": len(rows), "offset": offset,
                "next_offset": offset + limit if offset + limit < len(rows) else None, "adapters": adapters,
                "points": points, "tags": dict(sorted(tags.items())),
                "map": {"method": "first two principal axes of the adapters' mean embeddings",
                        "explained": [] if pmap is None else [float(v) for v in pmap.explained]}}

    def project(self, embeddings: np.ndarray) -> builtins.list[builtins.list[float]]:  # `list` is a method here
        """(n, d) request embeddings -> their (x, y) on the pool map (zeros for an empty pool)."""
        _, pmap = self._pool_map()
        z = np.atleast_2d(np.asarray(embeddings))
        if pmap is None:
            return [[0.0, 0.0] for _ in range(z.shape[0])]
        return pmap.project(z).tolist()


RegistryService = serve.deployment(RegistryReplica, name="RegistryService")
