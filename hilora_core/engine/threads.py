"""torch CPU threads of the calling OS thread, set so that no other thread can undo it.

torch (OpenMP build) keeps two counts:
- a process-wide one, which ``torch.set_num_threads`` writes from any thread;
- one per OS thread, which that thread copies from the process-wide count at its *first* parallel op
  (a lazy, once-per-thread initialisation), and which only that thread's ``set_num_threads`` changes
  afterwards.

A thread that calls ``set_num_threads(n)`` and runs its first op later loses ``n`` when another thread
sets a different count in between: the lazy initialisation copies the other thread's value. That is
how a replica's generation loop once ran on one thread instead of two (a helper thread had set one;
measured in ``docs/load-test.md`` with ``benchmarks/thread_teams.py``). :func:`use_torch_threads` runs the
initialisation first, so the count it sets stays.

Each thread that has run a parallel op also keeps its own OpenMP team; two teams of N threads on N
cores slow each other down. So one thread generates with N threads, and helper threads use one.
"""

from __future__ import annotations

import torch


def use_torch_threads(n: int) -> None:
    """Give the calling thread ``n`` torch CPU threads for good (see the module docstring)."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n!r}")
    torch.get_num_threads()  # runs this thread's one-time initialisation now, not at its first op
    torch.set_num_threads(n)
