"""One routed layer's adapter memory: rank rows in a pool shared by the layers of its shape.

    RowPool     a_rows (N + 1, d_in), bt_rows (N + 1, d_out): row 0 is all zeros; every routed layer with
                these (d_in, d_out) takes its adapters' rows here (B transposed: a ROC is one row of each)
    LayerSlots  row_table   (H, W)  per slot (a resident adapter's handle), its row ids; 0 past its rank
                scalings (H,), ranks (H,) (0 where the slot's adapter does not adapt this layer)
                prototypes  (H, d_in)  Arrow prototypes, computed only when an Arrow plan first uses the slot
                host_ranks, host_scalings  the same ranks and scalings as Python lists, written with them, so
                            building a batch's routing reads no device values (no host sync)

No padding to a largest rank, so ranks 1 to ``max_rank`` coexist. Gathering slots' stacks at rank R
(:meth:`LayerSlots.gather`) reads their rows through ``row_table``; positions past an adapter's own rank
read the zero row, exactly the zero-padded stacks the routing rules expect. Rows, slots and table columns
grow on demand (by half), and freed rows are reused, so nothing is reallocated per request.

Why shared pools: the budget bounds the rows in use summed over layers, but a pool per layer grows to that
layer's own peak, and the peaks come at different times (q/v adapters fill the attention layers, all-linear
ones the MLP): in the soak of ``docs/soak.md`` 210 per-layer pools held 2.2x the 256 MiB budget. One pool per
shape (a handful for a decoder) grows only to the peak of its layers' sum.
"""

from __future__ import annotations

import torch


def _grown(t: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """``t`` zero-extended along ``dim`` to ``size``."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size
    new = torch.zeros(shape, device=t.device, dtype=t.dtype)
    new.narrow(dim, 0, t.shape[dim]).copy_(t)
    return new


class RowPool:
    """Rank rows shared by the routed layers of one shape (shapes in the module docstring)."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype, n_rows: int = 64) -> None:
        self.a_rows = torch.zeros((n_rows + 1, d_in), device=device, dtype=dtype)
        self.bt_rows = torch.zeros((n_rows + 1, d_out), device=device, dtype=dtype)
        self._free = list(range(n_rows, 0, -1))  # pop() takes the lowest free row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a_rows, self.bt_rows))

    def take(self, r: int) -> list[int]:
        """``r`` free row ids (the pool grows by half when too few are free)."""
        if len(self._free) < r:
            old = self.a_rows.shape[0] - 1
            new = max(old + r, old + old // 2)
            self.a_rows = _grown(self.a_rows, new + 1)
            self.bt_rows = _grown(self.bt_rows, new + 1)
            self._free = list(range(new, old, -1)) + self._free
        return [self._free.pop() for _ in range(r)]

    def give(self, rows: list[int]) -> None:
        """Return rows (taken back in the order they were taken, so a run of rows stays a run)."""
        self._free.extend(reversed(rows))


class LayerSlots:
    """The slots of one routed linear layer over its :class:`RowPool` (shapes in the module docstring)."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype, n_slots: int = 4,
                 n_rows: int = 64, pool: RowPool | None = None) -> None:
        self.d_in, self.d_out = d_in, d_out
        self.pool = pool if pool is not None else RowPool(d_in, d_out, device, dtype, n_rows)
        self._rows_of: dict[int, list[int]] = {}
        self.row_table = torch.zeros((n_slots, 1), device=device, dtype=torch.long)
        self.scalings = torch.zeros((n_slots,), device=device, dtype=dtype)
        self.ranks = torch.zeros((n_slots,), device=device, dtype=torch.long)
        self.prototypes = torch.zeros((n_slots, d_in), device=device, dtype=dtype)
        self.host_ranks = [0] * n_slots
        self.host_scalings = [0.0] * n_slots

    @property
    def a_rows(self) -> torch.Tensor:
        return self.pool.a_rows

    @property
    def bt_rows(self) -> torch.Tensor:
        return self.pool.bt_rows

    @property
    def n_slots(self) -> int:
        return len(self.host_ranks)

    def nbytes(self) -> int:
        """Bytes of this layer's own tables (its rows are counted with its pool)."""
        return sum(t.numel() * t.element_size() for t in (self.row_table, self.scalings, self.ranks, self.prototypes))

    def grow_slots(self, n_slots: int) -> None:
        """Room for slot ids below ``n_slots``."""
        if n_slots <= self.n_slots:
            return
        self.row_table = _grown(self.row_table, n_slots)
        self.scalings = _grown(self.scalings, n_slots)
        self.ranks = _grown(self.ranks, n_slots)
        self.prototypes = _grown(self.prototypes, n_slots)
        extra = n_slots - len(self.host_ranks)
        self.host_ranks += [0] * extra
        self.host_scalings += [0.0] * extra

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Write one adapter's (r, d_in) ``a``, (d_out, r) ``b`` and scaling into r rows for ``slot``."""
        self.clear(slot)
        r = int(a.shape[0])
        rows = self.pool.take(r)
        self._rows_of[slot] = rows
        if self.row_table.shape[1] < r:
            self.row_table = _grown(self.row_table, r, dim=1)
        # non_blocking: from pinned host memory to a CUDA device the copy is queued on the current stream, before
        # the next forward pass that reads the rows, and the loop thread does not wait for it (a no-op on CPU).
        # Few ops: placing runs once per adapted layer on the loop's thread, and each op there is a hand-off.
        if rows and rows[-1] - rows[0] == r - 1 and rows == list(range(rows[0], rows[0] + r)):  # one run (usual:
            self.a_rows[rows[0]: rows[0] + r].copy_(a, non_blocking=True)  # freed runs come back in order);
            self.bt_rows[rows[0]: rows[0] + r].copy_(b.T, non_blocking=True)  # converts the dtype in the same pass
            torch.arange(rows[0], rows[0] + r, out=self.row_table[slot, :r])
        else:
            dev, dt = self.a_rows.device, self.a_rows.dtype
            idx = torch.tensor(rows, device=dev, dtype=torch.long)
            self.a_rows.index_copy_(0, idx, a.to(device=dev, dtype=dt, non_blocking=True))
            self.bt_rows.index_copy_(0, idx, b.T.to(device=dev, dtype=dt, non_blocking=True))
            self.row_table[slot, :r] = idx
        self.scalings[slot] = scaling
        self.ranks[slot] = r
        self.host_ranks[slot] = r
        self.host_scalings[slot] = float(scaling)

    def clear(self, slot: int) -> None:
        """Give back ``slot``'s rows (their stale values are never read: the table points at row 0). A slot
        with nothing here returns at once: placing or evicting an adapter clears every routed layer, most of
        which it does not adapt, and the six small writes each took a share of the loop (issue 27's profile)."""
        rows = self._rows_of.pop(slot, None)
        if rows is None and self.host_ranks[slot] == 0:
            return
        if rows:
            self.pool.give(rows)
        self.row_table[slot].zero_()
        self.scalings[slot] = 0
        self.ranks[slot] = 0
        self.prototypes[slot].zero_()
        self.host_ranks[slot] = 0
        self.host_scalings[slot] = 0.0

    def rows_of(self, slot: int) -> list[int]:
        """The pool row ids of ``slot``'s rank rows here, in rank order ([] if it does not adapt this layer)."""
        return self._rows_of.get(slot, [])

    def gather(self, slot_ids: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (n, r, d_in), bt (n, r, d_out)) of the ``slot_ids`` (n,) at rank ``r``, zero past each one's rank."""
        if self.row_table.shape[1] < r:
            self.row_table = _grown(self.row_table, r, dim=1)
        idx = self.row_table.index_select(0, slot_ids)[:, :r].reshape(-1)
        n = slot_ids.shape[0]
        return (self.a_rows.index_select(0, idx).view(n, r, self.d_in),
                self.bt_rows.index_select(0, idx).view(n, r, self.d_out))

    def concat(self, slot_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a (S, d_in), bt (S, d_out), seg (S,)) of these slots' own rows, concatenated without padding:
        S is the sum of their ranks here, ``seg[j]`` the position in ``slot_ids`` that row j belongs to."""
        rows = [r for s in slot_ids for r in self._rows_of.get(s, [])]
        seg = [p for p, s in enumerate(slot_ids) for _ in self._rows_of.get(s, [])]
        device = self.a_rows.device
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        return (self.a_rows.index_select(0, idx), self.bt_rows.index_select(0, idx),
                torch.tensor(seg, dtype=torch.long, device=device))
