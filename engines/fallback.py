"""Compiled backends export the students only; the teacher runs on the eager engine.

`TeacherFallback` composes the two through their public `run`, so each keeps its own input
checks, padding rule and lock: the student engine's buckets are the ones the server sees.
`OrtEngine` and `TensorRTEngine` are this composition over their student engines.
"""

from __future__ import annotations

import torch

from .base import Engine


class TeacherFallback(Engine):
    """Students on `students` (ONNX Runtime, TensorRT), `model="teacher"` on `teacher`."""

    def __init__(self, students: Engine, teacher: Engine) -> None:
        super().__init__(students.bundle, students.buckets)
        self.students, self.teacher = students, teacher
        self.name = students.name
        self.device = getattr(students, "device", None)
        self.min_rows = students.min_rows
        self.batch_invariant = students.batch_invariant

    @property
    def failure(self) -> str | None:
        """Why this engine cannot serve: its own reason or either part's."""
        return self._failure or self.students.failure or self.teacher.failure

    @failure.setter
    def failure(self, reason: str | None) -> None:
        self._failure = reason

    def rows_for(self, model: str, n: int) -> int:
        engine = self.teacher if model == "teacher" else self.students
        return engine.rows_for(model, n)

    def run(self, model: str, steps: int, noise: torch.Tensor, labels: torch.Tensor):
        engine = self.teacher if model == "teacher" else self.students
        return engine.run(model, steps, noise, labels)

    def chunkable(self, model: str) -> bool:
        engine = self.teacher if model == "teacher" else self.students
        return engine.chunkable(model)

    def run_chunk(self, model, steps, z, labels, start, stop):
        engine = self.teacher if model == "teacher" else self.students
        return engine.run_chunk(model, steps, z, labels, start, stop)

    def _run(self, model, steps, noise, labels):  # run() never pads or locks here
        raise NotImplementedError
