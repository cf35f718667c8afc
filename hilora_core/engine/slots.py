"""Device tier: adapter memory sized by rank and bounded by bytes.

:class:`AdapterSlots` maps adapter names to slots (a resident adapter's handle); each routed layer keeps
the slots' rank rows in a :class:`~hilora_core.engine.layer_rows.LayerSlots` (``layer_rows.py``), over a row
pool shared by the layers of its shape, where an adapter of rank r takes r rows for each layer it adapts and
nothing elsewhere. What is resident is bounded
by bytes: the rows of all resident adapters, ``sum over layers of r * (d_in + d_out) * element size``,
stay within ``budget_bytes``; idle adapters leave in LRU order to make room, adapters held by a running
batch (reference count) or pinned never do. ``max_adapters`` optionally also caps their number.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from hilora_core.engine.adapter_files import HostAdapter
from hilora_core.engine.layer_rows import LayerSlots, RowPool
from hilora_core.engine.usage import AdapterUsage
from hilora_core.errors import CapacityError, InvalidInputError, PlanTooLargeError


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
    """Name -> slot mapping over the per-layer row pools: bounded by bytes, LRU, pinning, in-use protection.

    Args:
        budget_bytes: the most bytes the resident adapters' rows take (the device tier's budget).
        max_rank: the largest rank accepted (adapters above it are refused at registration).
        device, dtype: where and how the rows live.
        size_of: an adapter's bytes here by name, known without loading it (checks a plan before its loads).
        max_adapters: optional cap on the number of resident adapters (None: the budget alone).
        usage: per-adapter counters to add placements and evictions to.
    """

    def __init__(self, budget_bytes: int, max_rank: int, device: torch.device | str, dtype: torch.dtype,
                 size_of: Callable[[str], int] | None = None, max_adapters: int | None = None,
                 usage: AdapterUsage | None = None) -> None:
        if budget_bytes < 1:
            raise InvalidInputError(f"the adapter memory budget must be >= 1 byte, got {budget_bytes!r}")
        if max_rank < 1:
            raise InvalidInputError(f"max_rank must be >= 1, got {max_rank!r}")
        if max_adapters is not None and max_adapters < 1:
            raise InvalidInputError(f"max_slots must be >= 1 or None, got {max_adapters!r}")
        self.budget_bytes, self.max_rank, self.max_adapters = budget_bytes, max_rank, max_adapters
        self.device = torch.device(device)
        self.dtype = dtype
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self._size_of = size_of
        self.usage = usage or AdapterUsage()
        self.layers: dict[str, LayerSlots] = {}
        self._pools: dict[tuple[int, int], RowPool] = {}  # one row pool per layer shape (layer_rows.py)
        self._lock = threading.Lock()
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free: list[int] = []
        self._refcount: list[int] = []
        self._bytes: list[int] = []  # rows' bytes of the adapter in each slot
        self._slot_rank: list[int] = []  # max rank over layers of the adapter in each slot
        self._writes: list[int] = []  # bumped whenever a slot's tensors are written (see writes())
        self._pinned: set[str] = set()
        self._stale: set[int] = set()  # slots of removed adapters still held by a batch
        self._prototyped: set[int] = set()  # slots whose Arrow prototypes are computed
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- layers and sizes -------------------------------------------------------------------------
    def add_layer(self, name: str, d_in: int, d_out: int) -> LayerSlots:
        """The row pool of a newly routed layer (resident adapters have rank 0 there)."""
        with self._lock:
            if name not in self.layers:
                pool = self._pools.get((d_in, d_out))
                if pool is None:
                    pool = self._pools[(d_in, d_out)] = RowPool(d_in, d_out, self.device, self.dtype)
                self.layers[name] = LayerSlots(d_in, d_out, self.device, self.dtype, max(4, len(self._refcount)),
                                               pool=pool)
            return self.layers[name]

    def nbytes_of(self, host: HostAdapter) -> int:
        """Bytes an adapter's rows take here: sum over its layers of r * (d_in + d_out) * element size."""
        return sum(lo.rank * (lo.a.shape[1] + lo.b.shape[0]) for lo in host.layers.values()) * self.element_size

    def check_fits(self, names: list[str]) -> None:
        """:class:`PlanTooLargeError` if these adapters together can never be resident at once."""
        if self.max_adapters is not None and len(names) > self.max_adapters:
            raise PlanTooLargeError(f"the plan needs {len(names)} adapters at once; the replica keeps at most "
                                f"{self.max_adapters} resident (max_slots)")
        if self._size_of is not None:
            need = sum(self._size_of(n) for n in names)
            if need > self.budget_bytes:
                raise PlanTooLargeError(f"the plan's adapters need {need / 2**20:.1f} MiB of adapter memory at once; "
                                        f"the budget is {self.budget_bytes / 2**20:.1f} MiB (adapter_memory_bytes)")

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

    def allocated_bytes(self) -> int:
        """Bytes the row pools and tables hold now (the budget bounds the rows in use; pools grow by halves)."""
        return sum(layer.nbytes() for layer in self.layers.values()) + sum(p.nbytes() for p in self._pools.values())

    def stats(self) -> dict[str, int | None]:
        with self._lock:
            return {
                "size": len(self._resident),
                "capacity": self.max_adapters,
                "pinned": len(self._pinned),
                "in_use": sum(1 for c in self._refcount if c > 0),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "bytes": self.used_bytes,
                "budget_bytes": self.budget_bytes,
                "allocated_bytes": self.allocated_bytes(),
            }

    # ---- acquire / release ---------------------------------------------------------------------
    def acquire(self, names: Iterable[str], fetch: Callable[[str], HostAdapter]) -> SlotLease:
        """Make every adapter in ``names`` resident and hold its slot until the lease is released.

        ``fetch(name)`` returns the adapter's host tensors; it is called outside the lock for
        adapters that are not resident. :class:`CapacityError` when the idle adapters cannot make room.
        """
        wanted = list(dict.fromkeys(names))
        self.check_fits(wanted)
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
            todo = [(n, fetched.get(n) or fetch(n)) for n in wanted if n not in held]
            self._make_room(sum(self.nbytes_of(h) for _, h in todo), len(todo), len(wanted))
            for n, host in todo:
                slot = self._new_slot()
                self._fill(slot, host)
                self._resident[n] = slot
                self._refcount[slot] += 1
                held[n] = slot
                self.misses += 1
                self.usage.add("placements", [n])
        except BaseException:
            self._release_locked(held.values())
            raise
        return SlotLease(held, self)

    def _make_room(self, need: int, count: int, batch_size: int) -> None:
        """Evict idle, unpinned adapters, least recently used first, until ``need`` bytes and ``count`` more
        adapters fit; evicts nothing and raises :class:`CapacityError` when they cannot."""
        victims, free_bytes, free_count = [], self.budget_bytes - self.used_bytes, None
        if self.max_adapters is not None:
            free_count = self.max_adapters - len(self._resident)
        for victim, slot in self._resident.items():
            if free_bytes >= need and (free_count is None or free_count >= count):
                break
            if self._refcount[slot] == 0 and victim not in self._pinned:
                victims.append(victim)
                free_bytes += self._bytes[slot]
                free_count = None if free_count is None else free_count + 1
        if free_bytes < need or (free_count is not None and free_count < count):
            busy = sum(1 for c in self._refcount if c > 0)
            raise CapacityError(
                f"no room in adapter memory for {count} more adapters ({need / 2**20:.1f} MiB): "
                f"{self.used_bytes / 2**20:.1f} of {self.budget_bytes / 2**20:.1f} MiB are held by pinned adapters "
                f"({len(self._pinned)}) or in-flight batches ({busy}); this batch needs {batch_size} adapters")
        for victim in victims:
            self._free_slot(self._resident.pop(victim))
            self.evictions += 1
        self.usage.add("evictions", victims)

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._refcount)
        self._refcount.append(0)
        self._bytes.append(0)
        self._slot_rank.append(0)
        self._writes.append(0)
        for layer in self.layers.values():
            if slot >= layer.n_slots:
                layer.grow_slots(2 * layer.n_slots)
        return slot

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
        self._bytes[slot] = self.nbytes_of(host)
        self.used_bytes += self._bytes[slot]
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
                        a, bt = stacks.gather(torch.tensor([slot], device=self.device), r)
                        stacks.prototypes[slot].copy_(arrow_prototype(a[0], bt[0].T))
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
        self.used_bytes -= self._bytes[slot]
        self._bytes[slot] = 0
        self._slot_rank[slot] = 0
        self._stale.discard(slot)
        self._free.append(slot)

    # ---- pinning and removal -------------------------------------------------------------------
    def pin(self, name: str, fetch: Callable[[str], HostAdapter]) -> bool:
        """Load ``name`` and keep it resident until :meth:`unpin`; True if it was not pinned before.
        Pinned adapters may take at most half the budget (the rest serves the others)."""
        with self._lock:
            if name in self._pinned:
                return False
            pinned = sum(self._bytes[self._resident[n]] for n in self._pinned)
        own = self._size_of(name) if self._size_of is not None else 0
        if pinned + own > self.budget_bytes // 2 or (
                self.max_adapters is not None and len(self._pinned) + 1 >= self.max_adapters):
            raise CapacityError(f"cannot pin {name!r}: pinned adapters would take {(pinned + own) / 2**20:.1f} MiB "
                                f"({len(self._pinned) + 1} adapters); at most half the adapter memory "
                                f"({self.budget_bytes / 2**20:.1f} MiB) may be pinned and one slot must stay free")
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
        """Forget ``name`` (adapter removed). Its rows are freed now, or when the last batch releases it."""
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
