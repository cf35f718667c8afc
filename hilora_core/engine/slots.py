"""Device tier: a fixed number of adapter slots, preallocated per adapted layer.

Every routed layer owns a :class:`LayerSlots`:

    a_stack     (S, R, d_in)   rows >= r of a slot are zero
    bt_stack    (S, R, d_out)  B transposed (so a slot's ROCs are contiguous rows); rows >= r are zero
    scalings    (S,)
    ranks       (S,)           0 where the slot's adapter does not adapt this layer
    prototypes  (S, d_in)      Arrow prototypes, computed only when an Arrow plan first uses the slot
    host_ranks, host_scalings  the same ranks and scalings as Python lists, written with them, so
                               building a batch's routing reads no device values (no host sync)

S = ``n_slots`` and R = ``max_rank`` are settings. Filling a slot writes these tensors in
place (nothing is reallocated per request). :class:`AdapterSlots` maps adapter names to
slots with LRU replacement; a slot is never evicted while a batch holds it (reference
count) or while it is pinned. A batch that needs more distinct adapters than can be
made resident raises :class:`CapacityError`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from hilora_core.engine.adapter_files import HostAdapter
from hilora_core.errors import CapacityError, InvalidInputError


@dataclass
class LayerSlots:
    """The preallocated stacks of one routed linear layer (shapes in the module docstring)."""

    a_stack: torch.Tensor
    bt_stack: torch.Tensor
    scalings: torch.Tensor
    ranks: torch.Tensor
    prototypes: torch.Tensor
    host_ranks: list[int] = field(default_factory=list)
    host_scalings: list[float] = field(default_factory=list)

    @classmethod
    def allocate(cls, n_slots: int, max_rank: int, d_in: int, d_out: int, device, dtype) -> LayerSlots:
        return cls(
            a_stack=torch.zeros((n_slots, max_rank, d_in), device=device, dtype=dtype),
            bt_stack=torch.zeros((n_slots, max_rank, d_out), device=device, dtype=dtype),
            scalings=torch.zeros((n_slots,), device=device, dtype=dtype),
            ranks=torch.zeros((n_slots,), device=device, dtype=torch.long),
            prototypes=torch.zeros((n_slots, d_in), device=device, dtype=dtype),
            host_ranks=[0] * n_slots,
            host_scalings=[0.0] * n_slots,
        )

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Write one adapter's (r, d_in) ``a``, (d_out, r) ``b`` and scaling into ``slot`` (cleared first)."""
        self.clear(slot)
        r = a.shape[0]
        self.a_stack[slot, :r].copy_(a)
        self.bt_stack[slot, :r].copy_(b.T)
        self.scalings[slot] = scaling
        self.ranks[slot] = r
        self.host_ranks[slot] = r
        self.host_scalings[slot] = float(scaling)

    def clear(self, slot: int) -> None:
        self.a_stack[slot].zero_()
        self.bt_stack[slot].zero_()
        self.scalings[slot] = 0
        self.ranks[slot] = 0
        self.prototypes[slot].zero_()
        self.host_ranks[slot] = 0
        self.host_scalings[slot] = 0.0


@dataclass
class SlotLease:
    """The slots a batch holds: ``slots[name]`` is the slot index. Release exactly once."""

    slots: dict[str, int]
    owner: AdapterSlots
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self.slots.values())

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AdapterSlots:
    """Name -> slot mapping over the per-layer stacks, LRU with pinning and in-use protection.

    Args:
        n_slots: S, the number of adapters resident on the device at once.
        max_rank: R, the largest adapter rank a slot holds.
        device, dtype: where and how the stacks live.
    """

    def __init__(self, n_slots: int, max_rank: int, device: torch.device | str, dtype: torch.dtype) -> None:
        if n_slots < 1:
            raise InvalidInputError(f"max_slots must be >= 1, got {n_slots!r}")
        if max_rank < 1:
            raise InvalidInputError(f"max_rank must be >= 1, got {max_rank!r}")
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers: dict[str, LayerSlots] = {}
        self._lock = threading.Lock()
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free: list[int] = list(range(n_slots))
        self._refcount = [0] * n_slots
        self._slot_rank = [0] * n_slots  # max rank over layers of the adapter in each slot
        self._pinned: set[str] = set()
        self._stale: set[int] = set()  # slots of removed adapters still held by a batch
        self._prototyped: set[int] = set()  # slots whose Arrow prototypes are computed
        self._writes = [0] * n_slots  # bumped whenever a slot's tensors are written (see writes())
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- layers -------------------------------------------------------------------------------
    def add_layer(self, name: str, d_in: int, d_out: int) -> LayerSlots:
        """Allocate the stacks of a newly routed layer (resident adapters get rank 0 there)."""
        with self._lock:
            if name not in self.layers:
                self.layers[name] = LayerSlots.allocate(
                    self.n_slots, self.max_rank, d_in, d_out, self.device, self.dtype
                )
            return self.layers[name]

    # ---- queries ------------------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._resident.get(name)

    def slot_rank(self, slot: int) -> int:
        return self._slot_rank[slot]

    def lru_order(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def in_use(self, name: str) -> bool:
        with self._lock:
            slot = self._resident.get(name)
            return slot is not None and self._refcount[slot] > 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "size": len(self._resident),
                "capacity": self.n_slots,
                "pinned": len(self._pinned),
                "in_use": sum(1 for c in self._refcount if c > 0),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }

    # ---- acquire / release ---------------------------------------------------------------------
    def acquire(self, names: Iterable[str], fetch: Callable[[str], HostAdapter]) -> SlotLease:
        """Make every adapter in ``names`` resident and hold its slot until the lease is released.

        ``fetch(name)`` returns the adapter's host tensors; it is called outside the lock for
        adapters that are not resident (disk I/O must not block other batches).
        """
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.n_slots:
            raise CapacityError(
                f"a batch needs {len(wanted)} distinct adapters but the engine has {self.n_slots} slots "
                f"(max_slots); split the batch or raise max_slots"
            )
        with self._lock:
            missing = [n for n in wanted if n not in self._resident]
        fetched = {n: fetch(n) for n in missing}
        with self._lock:
            return self._acquire_locked(wanted, fetched, fetch)

    def _acquire_locked(self, wanted, fetched, fetch) -> SlotLease:
        held: dict[str, int] = {}
        try:
            for n in wanted:  # hits first, so they cannot be chosen as victims below
                slot = self._resident.get(n)
                if slot is not None:
                    self._resident.move_to_end(n)
                    self._refcount[slot] += 1
                    held[n] = slot
                    self.hits += 1
            for n in wanted:
                if n in held:
                    continue
                slot = self._take_slot(n, len(wanted))
                host = fetched.get(n) or fetch(n)
                self._fill(slot, host)
                self._resident[n] = slot
                self._refcount[slot] += 1
                held[n] = slot
                self.misses += 1
        except BaseException:
            self._release_locked(held.values())
            raise
        return SlotLease(held, self)

    def _take_slot(self, name: str, batch_size: int) -> int:
        if self._free:
            return self._free.pop(0)
        for victim, slot in self._resident.items():  # least recently used first
            if self._refcount[slot] == 0 and victim not in self._pinned:
                del self._resident[victim]
                self.evictions += 1
                return slot
        busy = sum(1 for c in self._refcount if c > 0)
        raise CapacityError(
            f"no free adapter slot for {name!r}: all {self.n_slots} slots are pinned ({len(self._pinned)}) or "
            f"held by in-flight batches ({busy}); this batch needs {batch_size} adapters"
        )

    def writes(self, slots: Iterable[int]) -> tuple[int, ...]:
        """How often each of these slots' tensors were written: equal counts mean equal contents, so
        copies gathered from them are still valid."""
        with self._lock:
            return tuple(self._writes[s] for s in slots)

    def _fill(self, slot: int, host: HostAdapter) -> None:
        self._writes[slot] += 1
        unknown = set(host.layers) - set(self.layers)
        assert not unknown, f"layers {sorted(unknown)[:3]} were not registered before filling a slot"
        top = 0
        for layer_name, stacks in self.layers.items():
            lora = host.layers.get(layer_name)
            if lora is None:
                stacks.clear(slot)
                continue
            stacks.set_slot(slot, lora.a, lora.b, lora.scaling)
            top = max(top, lora.rank)
        self._slot_rank[slot] = top
        self._stale.discard(slot)
        self._prototyped.discard(slot)

    def ensure_prototypes(self, slots: Iterable[int]) -> None:
        """Compute the Arrow prototypes of these (held) slots at every layer, once per filling.

        Only the Arrow baseline reads them: a pool that is never routed by Arrow never pays the SVDs.
        """
        from hilora_core.baselines.arrow import arrow_prototype

        with self._lock:
            todo = [s for s in slots if s not in self._prototyped]
            for slot in todo:
                for stacks in self.layers.values():
                    r = stacks.host_ranks[slot]
                    if r > 0:
                        proto = arrow_prototype(stacks.a_stack[slot, :r], stacks.bt_stack[slot, :r].T)
                        stacks.prototypes[slot].copy_(proto)
                self._prototyped.add(slot)
                self._writes[slot] += 1

    def _release(self, slots: Iterable[int]) -> None:
        with self._lock:
            self._release_locked(slots)

    def _release_locked(self, slots: Iterable[int]) -> None:
        for slot in slots:
            assert self._refcount[slot] > 0, f"slot {slot} released more often than acquired"
            self._refcount[slot] -= 1
            if self._refcount[slot] == 0 and slot in self._stale:
                self._free_slot(slot)

    def _free_slot(self, slot: int) -> None:
        self._writes[slot] += 1
        for stacks in self.layers.values():
            stacks.clear(slot)
        self._slot_rank[slot] = 0
        self._stale.discard(slot)
        self._free.append(slot)

    # ---- pinning and removal -------------------------------------------------------------------
    def pin(self, name: str, fetch: Callable[[str], HostAdapter]) -> bool:
        """Load ``name`` and keep it resident until :meth:`unpin`; True if it was not pinned before."""
        with self._lock:
            if name in self._pinned:
                return False
            if len(self._pinned) + 1 >= self.n_slots:
                raise CapacityError(
                    f"cannot pin {name!r}: {len(self._pinned)} of {self.n_slots} slots are pinned and at least "
                    "one must stay free for other adapters"
                )
        lease = self.acquire([name], fetch)
        with self._lock:
            self._pinned.add(name)
        lease.release()
        return True

    def unpin(self, name: str) -> bool:
        with self._lock:
            if name not in self._pinned:
                return False
            self._pinned.discard(name)
            return True

    def drop(self, name: str) -> bool:
        """Forget ``name`` (adapter removed). Its slot is cleared now, or when the last batch releases it."""
        with self._lock:
            self._pinned.discard(name)
            slot = self._resident.pop(name, None)
            if slot is None:
                return False
            if self._refcount[slot] == 0:
                self._free_slot(slot)
            else:
                self._stale.add(slot)
            return True
