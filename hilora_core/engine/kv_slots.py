"""Preallocated KV memory for a running batch whose rows come and go between decode steps.

Layout, per decoder layer: ``keys`` and ``values`` of shape (rows, kv_heads, columns, head_dim),
allocated once and grown (doubling) up to the settings' bounds, never shrunk. Every running row
ends at the same column, ``head``: row ``r`` holds its tokens in columns ``[start[r], head)``
and its next token is written at column ``head``. So one decode step writes one column for all
rows at once, and a row that joins is prefilled straight into the columns just before ``head``.
Columns left of a row's ``start`` hold stale values of earlier rows; the attention mask hides them.

The cache is handed to the Hugging Face model as ``past_key_values``: before each forward pass
:meth:`SlotKVCache.window` says which rows it runs on, where it writes and from which column it
reads, and :meth:`SlotKVCache.attention_mask` gives the matching 4-D mask.

    cache = SlotKVCache.for_model(model.config, max_rows=32, max_columns=2048, device, dtype)
    cache.window(rows=(0, 8), write=cache.head, read=cache.low)   # a decode step of 8 rows
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hilora_core.engine.families import AttentionLayout
from hilora_core.errors import CapacityError


def kv_geometry(config) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head dim) of a transformers model config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's view of :class:`SlotKVCache` (the interface transformers calls)."""

    def __init__(self, owner: SlotKVCache, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (B, H, T, D) states at the window's columns; return the window's (B, H, K, D) keys, values."""
        return self.owner._write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        lo, hi = self.owner._read_span(query_length)
        return hi - lo, 0

    def get_seq_length(self) -> int:
        return self.owner.head - self.owner.low

    def get_max_length(self) -> int:
        return self.owner.max_columns


class SlotKVCache(Cache):
    """KV memory of up to ``max_rows`` rows of up to ``max_columns`` tokens each (see the module docstring).

    Args:
        n_layers, kv_heads, head_dim: of the model.
        max_rows: rows the buffers may grow to (the running batch's bound).
        max_columns: columns the buffers may grow to (a row's prompt plus generated tokens).
        device, dtype: of the model.
        initial_rows, initial_columns: first allocation (grown by doubling when needed).
    """

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, max_rows: int, max_columns: int,
                 device: torch.device | str, dtype: torch.dtype, initial_rows: int = 4,
                 initial_columns: int = 256) -> None:
        super().__init__(layers=[])
        self.layers = [_SlotLayer(self, i) for i in range(n_layers)]
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.max_rows, self.max_columns = max_rows, max_columns
        self.device, self.dtype = torch.device(device), dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(min(initial_rows, max_rows), min(initial_columns, max_columns))
        self.head = 0  # the column the next decode step writes
        self.low = 0  # the smallest start among running rows
        self._rows = (0, 0)
        self._write_at = 0
        self._read_from = 0

    @classmethod
    def for_model(cls, config, max_rows: int, max_columns: int, device, dtype, **kwargs) -> SlotKVCache:
        return cls(*kv_geometry(config), max_rows, max_columns, device, dtype, **kwargs)

    # ---- memory --------------------------------------------------------------------------------------
    @property
    def row_capacity(self) -> int:
        return self.keys[0].shape[0]

    @property
    def column_capacity(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by the buffers now."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _allocate(self, rows: int, columns: int) -> None:
        old_k, old_v = self.keys, self.values
        shape = (rows, self.kv_heads, columns, self.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        for new, old in zip(self.keys + self.values, old_k + old_v, strict=False):
            r, c = min(rows, old.shape[0]), min(columns, old.shape[2])
            new[:r, :, :c].copy_(old[:r, :, :c])

    def reserve(self, rows: int, columns: int) -> None:
        """Grow (doubling, up to the bounds) so that ``rows`` rows and ``columns`` columns fit."""
        if rows > self.max_rows or columns > self.max_columns:
            raise CapacityError(f"KV memory holds {self.max_rows} rows of {self.max_columns} tokens; "
                                f"asked for {rows} rows of {columns}")
        if rows <= self.row_capacity and columns <= self.column_capacity:
            return
        new_rows, new_cols = self.row_capacity, self.column_capacity
        while new_rows < rows:
            new_rows = min(2 * new_rows, self.max_rows)
        while new_cols < columns:
            new_cols = min(2 * new_cols, self.max_columns)
        self._allocate(new_rows, new_cols)

    # ---- moving rows and columns -----------------------------------------------------------------------
    def move_row(self, src: int, dst: int, start: int = 0) -> None:
        """Copy row ``src``'s columns ``[start, head)`` to row ``dst`` (a leaving row's place is refilled)."""
        for buf in self.keys + self.values:
            buf[dst, :, start: self.head].copy_(buf[src, :, start: self.head])

    def shift(self, n_rows: int, by: int) -> None:
        """Move the first ``n_rows`` rows' columns ``[low, head)`` by ``by`` columns (left if negative)."""
        if by == 0:
            return
        lo, hi = self.low, self.head
        self.reserve(n_rows, hi + by)
        for buf in self.keys + self.values:
            buf[:n_rows, :, lo + by: hi + by] = buf[:n_rows, :, lo:hi].clone()
        self.low, self.head = lo + by, hi + by

    # ---- one forward pass --------------------------------------------------------------------------
    def window(self, rows: tuple[int, int], write: int, read: int) -> None:
        """The next forward pass runs rows ``[rows[0], rows[1])``, writes its T tokens at columns
        ``[write, write + T)`` and attends to columns ``[read, write + T)``."""
        self._rows, self._write_at, self._read_from = rows, write, read

    def _read_span(self, query_length: int) -> tuple[int, int]:
        return self._read_from, self._write_at + query_length

    def _write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        r0, r1 = self._rows
        t = key_states.shape[2]
        w = self._write_at
        k, v = self.keys[layer], self.values[layer]
        k[r0:r1, :, w: w + t].copy_(key_states)
        v[r0:r1, :, w: w + t].copy_(value_states)
        return k[r0:r1, :, self._read_from: w + t], v[r0:r1, :, self._read_from: w + t]

    def attention_masks(self, layout: AttentionLayout, starts: Sequence[int], query_length: int,
                        kind: str) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask(s) of the current window for a model's :class:`AttentionLayout`: one (B, 1, T, K) mask
        when every layer follows one rule, else ``{layer type: mask}`` (the decoder picks each layer's)."""
        masks = {t: self.attention_mask(starts, query_length, kind, layout.window_of(t)) for t in layout.kinds}
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def attention_mask(self, starts: Sequence[int], query_length: int, kind: str,
                       window: int | None = None) -> torch.Tensor:
        """The (B, 1, T, K) mask of the current window: query ``t`` of row ``b`` (at column ``write + t``)
        sees the columns from ``starts[b]`` up to its own, and with a sliding ``window`` only the columns
        after ``write + t - window`` (a row's positions are its columns less its start, so the window is
        the same in columns). A query left of its row's start (left padding of a prefill) sees only
        itself, so padding never produces NaN.

        ``kind``: ``"bool"`` (True = attend; SDPA) or ``"additive"`` (0 / -inf-like; eager attention).
        """
        lo, hi = self._read_span(query_length)
        cols = torch.arange(lo, hi, device=self.device)  # (K,)
        q_cols = torch.arange(self._write_at, self._write_at + query_length, device=self.device)  # (T,)
        start = torch.as_tensor(list(starts), device=self.device).view(-1, 1, 1)  # (B, 1, 1)
        causal = cols.view(1, 1, -1) <= q_cols.view(1, -1, 1)  # (1, T, K)
        allowed = causal & (cols.view(1, 1, -1) >= start)  # (B, T, K)
        if window is not None:
            allowed = allowed & (cols.view(1, 1, -1) > q_cols.view(1, -1, 1) - window)
        allowed = allowed | (cols.view(1, 1, -1) == q_cols.view(1, -1, 1))
        allowed = allowed.unsqueeze(1)
        if kind == "bool":
            return allowed
        zero = torch.zeros((), device=self.device, dtype=self.dtype)
        return torch.where(allowed, zero, torch.tensor(torch.finfo(self.dtype).min, device=self.device,
                                                       dtype=self.dtype))
