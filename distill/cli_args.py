"""Argument types shared by every `halfstep` subcommand (distill is the bottom layer, so the
export, server and eval command lines can all import from here)."""

from __future__ import annotations

import argparse


def positive_ints(text: str, allow_empty: bool = False) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; every value must be >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values and not allow_empty:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if values and min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_ints_or_empty(text: str) -> list[int]:
    """Like positive_ints, but an empty string means 'none of these'."""
    return positive_ints(text, allow_empty=True)


def round_iterations(text: str) -> dict[int, int]:
    """'4=500,2=1000' -> {4: 500, 2: 1000}: student steps -> iterations of the round making it."""
    out: dict[int, int] = {}
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        steps, sep, iters = item.partition("=")
        try:
            if not sep:
                raise ValueError
            n, k = int(steps), int(iters)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected STEPS=ITERATIONS pairs such as 4=500,2=1000, got {item!r}"
            ) from None
        if n < 1 or k < 1:
            raise argparse.ArgumentTypeError(f"steps and iterations must be >= 1, got {item!r}")
        if n in out:
            raise argparse.ArgumentTypeError(f"round {n} is given twice in {text!r}")
        out[n] = k
    return out
