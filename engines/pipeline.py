"""Batches in flight: `PendingBatch` (a launched batch whose images are collected later) and
`SlotRing` (which of a graph's buffer sets the next batch may use).

`engine.launch(model, steps, noise, labels)` returns a PendingBatch; `.result()` gives exactly
what `engine.run` would have returned (float32 CPU images, n rows, the same bytes). The base
Engine runs the batch inside `launch` and hands back a finished PendingBatch; CudaGraphEngine
only enqueues the batch on the GPU, so the caller can launch batch k+1 before collecting k.

Both classes are pure Python (no CUDA) so their bookkeeping is tested on any machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class PendingBatch:
    """A launched batch. `result()` waits for it the first time it is called (from any thread)
    and returns the same tensor on every call; a failure is raised by every call.

    `finish` is what waits and returns the images (for a CUDA batch: synchronize on the event
    recorded after its device->host copy, then copy the rows out of the pinned staging buffer).
    It runs exactly once, either when the caller collects the batch or earlier, when the buffer
    set the batch used is needed again (`SlotRing.claim`), which moves the images out first.
    """

    __slots__ = ("_finish", "_images", "_error", "_lock")

    def __init__(self, finish: Callable[[], torch.Tensor]) -> None:
        self._finish: Callable[[], torch.Tensor] | None = finish
        self._images: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @classmethod
    def finished(cls, images: torch.Tensor) -> PendingBatch:
        """A batch that already ran (the synchronous default of `Engine.launch`)."""
        pending = cls(lambda: images)
        pending.wait()
        return pending

    @property
    def collected(self) -> bool:
        """True once the images (or the failure) are held here: the batch no longer needs the
        buffers it ran in."""
        return self._finish is None

    def wait(self) -> None:
        """Wait for the batch and keep its images or its failure; never raises."""
        with self._lock:
            if self._finish is None:
                return
            finish, self._finish = self._finish, None
            try:
                self._images = finish()
            except Exception as exc:  # kept, and raised by every result()
                self._error = exc
            except BaseException:  # e.g. KeyboardInterrupt: not collected, may be waited again
                self._finish = finish
                raise

    def result(self) -> torch.Tensor:
        """The batch's images: float32 CPU, exactly the launched rows (waits if needed)."""
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._images is not None
        return self._images


class SlotRing:
    """Hands out the buffer sets (slots) of one captured graph, alternating between them.

    A slot is busy from the launch that claims it until that batch is collected: its static
    device tensors and its pinned host staging still hold the batch's inputs or images. `claim`
    prefers a free slot (the least recently used one: with two slots, batches alternate). When
    every slot is busy it WAITS for the oldest batch and moves that batch's images out of the
    slot (its `result()` then returns them without waiting) before reusing it; it never raises
    and never hands out a slot whose images have not been copied out. Launches beyond the
    number of slots therefore block (back-pressure) instead of overwriting a result.

    Not thread-safe by itself: the engine calls `claim` under its lock.
    """

    def __init__(self, size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"a ring needs at least one slot, got {size}")
        self.size = size
        self._owners: list[PendingBatch | None] = [None] * size
        self._used = [0] * size  # launch count when each slot was last claimed (0: never)
        self._launches = 0

    def busy(self) -> list[int]:
        """Slots whose batch has not been collected yet."""
        return [i for i, p in enumerate(self._owners) if p is not None and not p.collected]

    def pick(self) -> int:
        """The slot the next claim uses: the least recently used free one, else the oldest."""
        busy = set(self.busy())
        free = [i for i in range(self.size) if i not in busy]
        return min(free or range(self.size), key=lambda i: self._used[i])

    def claim(self, start: Callable[[int], PendingBatch]) -> PendingBatch:
        """`start(slot)` enqueues a batch on that slot's buffers and returns its PendingBatch;
        the slot's previous batch is waited for (and its images kept) first if still pending."""
        i = self.pick()
        previous = self._owners[i]
        if previous is not None:
            previous.wait()  # blocks only when every slot is busy; moves its images out
        self._owners[i] = None
        pending = start(i)
        self._launches += 1
        self._owners[i], self._used[i] = pending, self._launches
        return pending


def pad_rows(noise: torch.Tensor, labels: torch.Tensor, rows: int):
    """The batch padded to `rows` with copies of its first row (as `Engine.run` pads): the
    network is per-example, so padding rows never change the real rows."""
    n = noise.shape[0]
    if rows > n:
        noise = torch.cat([noise, noise[:1].expand(rows - n, *noise.shape[1:])])
        labels = torch.cat([labels, labels[:1].expand(rows - n)])
    return noise, labels
