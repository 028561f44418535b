"""Checkpoints inside a distillation round, so that an interrupted round continues where it
stopped instead of from its first iteration (the last rounds of a recipe run for hours, and a
preempted Kubernetes Job or a closed session would otherwise lose all of it).

Every batch of a round is drawn from (seed, student steps, iteration) alone, and the learning
rate is a function of the iteration, so a round continued at iteration k from the student and
Adam state saved after iteration k - 1 makes the same student as one that never stopped, under
any number of processes. The file holds the settings that fix those draws and the round's
teacher; a partial round made with other settings is refused, never silently mixed or dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import BundleError
from .io import atomic_torch_save


def partial_round_file(n_student: int) -> str:
    return f"round-{2 * n_student}to{n_student}.partial.pt"


def round_settings(cfg, n_student: int, teacher_sha256: str) -> dict:
    """What must agree for saved state to continue a round (`cfg`: a DistillConfig): its
    iterations and peak rate (the anneal), the batch draws, and the network it copies."""
    return {"iters": cfg.iters_for(n_student), "lr": cfg.lr_for(n_student),
            "batch_size": cfg.batch_size, "seed": cfg.seed, "label_dropout": cfg.label_dropout,
            "teacher_sha256": teacher_sha256}


@dataclass
class RoundCheckpoint:
    """Where and how often one round saves its state; `write` is False on ranks other than 0."""

    path: Path
    settings: dict
    every: int
    write: bool = True

    def load(self) -> dict | None:
        """The saved state of this round, or None when there is none."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            saved = state["settings"]
        except Exception as exc:  # torch raises several types for a damaged file
            raise BundleError(f"{self.path} is not a readable partial round ({exc!r}); delete "
                              "it to restart the round") from None
        differ = {k: (saved.get(k), self.settings[k]) for k in self.settings
                  if saved.get(k) != self.settings[k]}
        if differ:
            said = ", ".join(f"{k} {a!r} (now {b!r})" for k, a, b in
                             ((k, *v) for k, v in sorted(differ.items())))
            raise BundleError(
                f"{self.path} holds {state['next_iter']} iterations of this round made "
                f"with {said}; resume with the settings it was made with, or delete the file to "
                "restart the round with the new ones")
        return state

    def due(self, iterations_done: int, total: int) -> bool:
        return self.write and iterations_done % self.every == 0 and iterations_done < total

    def save(self, student: torch.nn.Module, opt: torch.optim.Optimizer, next_iter: int,
             losses: list[float], wall_s: float, gap_start: float) -> None:
        atomic_torch_save({
            "settings": self.settings,
            "next_iter": next_iter,
            "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
            "optimizer": opt.state_dict(),
            "losses": losses,
            "wall_s": wall_s,
            "gap_start": gap_start,
        }, self.path)

    def remove(self) -> None:
        if self.write and self.path.is_file():
            os.unlink(self.path)
