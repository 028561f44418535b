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


def _per_round(text: str, cast, name: str, example: str) -> dict:
    """'STEPS=VALUE,...' -> {steps: value}: settings of the rounds named by the student's steps."""
    out: dict = {}
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        steps, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            n, v = int(steps), cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected STEPS={name.upper()} pairs such as {example}, got {item!r}"
            ) from None
        if n < 1 or not v > 0:
            raise argparse.ArgumentTypeError(f"steps must be >= 1 and {name} > 0, got {item!r}")
        if n in out:
            raise argparse.ArgumentTypeError(f"round {n} is given twice in {text!r}")
        out[n] = v
    return out


def round_iterations(text: str) -> dict[int, int]:
    """'4=500,2=1000' -> {4: 500, 2: 1000}: student steps -> iterations of the round making it."""
    return _per_round(text, int, "iterations", "4=500,2=1000")


def round_learning_rates(text: str) -> dict[int, float]:
    """'128=5e-5,1=2e-4' -> {128: 5e-05, 1: 0.0002}: student steps -> that round's peak rate."""
    return _per_round(text, float, "lr", "128=5e-5,1=2e-4")


def student_from_bundle(text: str) -> tuple[int, str]:
    """'1=runs/other' -> (1, 'runs/other'): a student's steps and the bundle to take it from."""
    steps, sep, path = text.partition("=")
    try:
        n = int(steps)
    except ValueError:
        n = 0
    if not sep or n < 1 or not path:
        raise argparse.ArgumentTypeError(
            f"expected STEPS=BUNDLE such as 1=runs/longer-last-round, got {text!r}")
    return n, path
