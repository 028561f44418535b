"""The goals the benchmarks compare their measured ratios with, and the row lookup they use.

Each ratio is measured and reported with its goal; nothing here asserts.
"""

from __future__ import annotations

TARGET_GRAPH_SPEEDUP = 3.0  # eager / cudagraph engine time, 4-step student, batch 1: >= 3x
TARGET_TEACHER_RATIO = 50.0  # teacher at 256 steps / 4-step student, batch 1: >= 50x
TARGET_OVERHEAD = 1.2  # HTTP p50 / engine time at batch 1: <= 1.2x
TARGET_VS_DIFFUSERS = 0.5  # fastest engine / diffusers at 4 steps, batch 1: <= 0.5x
TARGET_FLOOR = 0.5  # CPU engine at batch 64: >= 50% of the matmul rate
TARGET_THROUGHPUT = 0.8  # HTTP images/s at the top concurrency / engine's best batched: >= 0.8x


def find_row(rows: list[dict] | None, **match) -> dict | None:
    """The first row whose fields equal every `match` value, or None."""
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)
