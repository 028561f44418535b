"""A graceful stop for the long loops (teacher training, distillation rounds).

SIGTERM is how a run is asked to end from outside: Kubernetes evicting or preempting a pod
(then SIGKILL after the grace period, 30 s by default), `kill`, torchrun passing its own on to
its workers. Inside `graceful_stop()` the signal only sets a flag; the loop sees it at the end
of the iteration, saves its state as a checkpoint would and raises `Stopped`, so `--resume`
continues from that very iteration. Under torchrun the flag is reduced over the ranks every
iteration, so that all of them stop at the same one (a rank that stopped alone would leave the
others waiting in a collective).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_received: list[int] = []  # signal numbers seen inside graceful_stop()


class Stopped(Exception):
    """A loop saved its state and stopped on a signal; the message says how to continue."""

    exit_code = 128 + signal.SIGTERM  # what a shell reports for a run ended by SIGTERM


@contextmanager
def graceful_stop() -> Iterator[None]:
    """Turn SIGTERM into a request the loops check with `stop_requested` (main thread only:
    elsewhere Python cannot install handlers and the signal keeps its default action)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received.clear()


def stop_requested(device: Any = None) -> bool:
    """Whether any rank received SIGTERM; a collective under torchrun (call it on every rank
    at the same point of the loop). `device`: where the collective's tensor lives (NCCL: cuda).
    (torch is imported here: the CLI imports this module and starts without torch.)"""
    import torch
    import torch.distributed as dist

    asked = bool(_received)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.item())
    return asked
