"""The /generate request: its parameters and bounds, and how they become a job for the batcher.

The parameters are declared once, in `request_models`; the query string and the JSON body are
two readings of the same fields. `prepare` then checks them against the bundle (which student
a step budget buys, which labels exist) and draws each image's noise from its seed.
"""

from __future__ import annotations

import difflib
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model

from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.sample import request_seeds
from halfstep.distill.sampling import noise_for_seeds

MAX_N = 64
MAX_SEED = 2**53 - 1  # JSON numbers stay exact in JavaScript up to here
MAX_BUDGET = 1_000_000
MAX_DEADLINE_MS = 600_000
RANDOM_SEEDS = 2**32  # absent seed: drawn below this, so it survives JavaScript numbers
STEPS_DOC = ("student: your step budget; the largest distilled student with steps <= budget "
             "runs (absent: the largest student); with exact=true, a student with exactly "
             "these steps or 422. teacher: exact steps (absent: the bundle's teacher default)")
DEADLINE_DOC = ("latency deadline: the largest student predicted to finish in time runs; steps "
                "is then the ceiling")
EXACT_DOC = ("student: demand a student with exactly `steps` steps (422 listing the students "
             "otherwise) instead of treating steps as a budget (default false)")


FIELDS = ("steps", "model", "n", "seed", "label", "format", "deadline_ms", "exact", "bundle")


class InvalidRequest(ValueError):
    """A parameter that is wrong for this bundle: answered 422 with what is allowed."""


def steps_doc(teacher_limit: int | None = None, teacher_off: bool = False) -> str:
    """STEPS_DOC with this server's teacher limit (--max-teacher-steps), or saying the teacher
    is turned off (--teacher off)."""
    if teacher_off:
        return f"{STEPS_DOC}; model=teacher is turned off on this server (--teacher off)"
    if teacher_limit is None:
        return STEPS_DOC
    return f"{STEPS_DOC}; teacher at most {teacher_limit} steps here (--max-teacher-steps)"


def request_models(num_labels: int, steps_description: str = STEPS_DOC,
                   bundles: list[str] | None = None) -> tuple[type[BaseModel], type[BaseModel]]:
    """The parameters for bundles with at most `num_labels` labels (each request's label is
    checked against its own bundle in `prepare`), as (query model, body model);
    `steps_description` documents `steps` (see `steps_doc`); `bundles`: the served names.

    Every field is optional. Both models have the same fields and bounds, and both refuse an
    unknown field (`unknown_field` says which, and what is allowed).
    """
    query = create_model(
        "GenerateQuery",
        __config__=ConfigDict(extra="forbid"),
        steps=(int | None, Field(None, ge=1, le=MAX_BUDGET, description=steps_description)),
        model=(Literal["student", "teacher"] | None, Field(None, description="default student")),
        n=(int | None, Field(None, ge=1, le=MAX_N, description="images (default 1)")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED, description="image i uses seed+i")),
        label=(int | None, Field(None, ge=0, le=max(num_labels - 1, 0),
                                 description="class label; absent = unconditional")),
        format=(Literal["png", "json"] | None, Field(None, description="default png")),
        deadline_ms=(int | None, Field(None, ge=1, le=MAX_DEADLINE_MS, description=DEADLINE_DOC)),
        exact=(bool | None, Field(None, description=EXACT_DOC)),
        bundle=(Literal[tuple(bundles)] | None if bundles else str | None,
                Field(None, description="which served bundle (default: the first)")),
    )

    class GenerateBody(query):
        pass

    return query, GenerateBody


def unknown_field(name: str) -> str:
    """The 422 message for a parameter that /generate does not have, in the query or the body."""
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field '{name}'; allowed: {', '.join(FIELDS)}{hint}"


def merge(query: BaseModel, body: BaseModel | None) -> dict[str, Any]:
    """The fields given in the query and in the body together; a field given in both is an
    error."""
    from_query = query.model_dump(exclude_none=True)
    from_body = body.model_dump(exclude_none=True) if body is not None else {}
    twice = sorted(from_query.keys() & from_body.keys())
    if twice:
        raise InvalidRequest(f"{', '.join(twice)} given both in the query and in the body; "
                             "send each field once")
    return {**from_query, **from_body}


@dataclass
class GenerateJob:
    model: str
    steps: int  # steps that run
    requested: int | None
    n: int
    seed: int
    label: int | None
    fmt: str
    noise: torch.Tensor
    labels: torch.Tensor
    deadline_ms: int | None = None  # latency deadline; steps is then the ceiling
    exact: bool = False  # student: exactly `steps`, never a smaller one (deadline_ms too)
    bundle: str | None = None  # the served bundle's name, once resolved (None: the default)


def prepare(p: dict[str, Any], bundle: Bundle) -> GenerateJob:
    """Resolve the step budget, check the label, and draw each image's noise from its seed."""
    model, fmt = p.get("model", "student"), p.get("format", "png")
    n, label, requested = p.get("n", 1), p.get("label"), p.get("steps")
    seed = p["seed"] if p.get("seed") is not None else secrets.randbelow(RANDOM_SEEDS)
    try:
        if model == "student":
            if not bundle.student_steps:
                raise InvalidRequest(f"bundle {bundle.name} has no students; use model=teacher")
            steps = student_steps(bundle, requested, bool(p.get("exact")))
        else:
            steps = requested if requested is not None else bundle.teacher_default_steps
            bundle.check_steps("teacher", steps)
    except BundleError as exc:
        raise InvalidRequest(str(exc)) from None
    k = bundle.num_labels
    if label is not None and not 0 <= label < k:
        raise InvalidRequest(f"label={label} is out of range; allowed: 0..{k - 1} or absent"
                             if k else "this bundle is unconditional: omit label")
    noise = noise_for_seeds(request_seeds(seed, n), bundle.image_shape)
    labels = torch.full((n,), k if label is None else label, dtype=torch.int64)
    return GenerateJob(model, steps, requested, n, seed, label, fmt, noise, labels,
                       deadline_ms=p.get("deadline_ms"), exact=bool(p.get("exact")))


def student_steps(bundle: Bundle, requested: int | None, exact: bool = False) -> int:
    """The student that runs: the largest with steps <= requested (absent: the largest); with
    `exact`, the one with exactly `requested` steps. Raises BundleError listing the students."""
    if requested is None:
        return bundle.student_steps[-1]
    if exact and requested not in bundle.student_steps:
        raise BundleError(f"exact=true: no student has steps={requested}; students: "
                          f"{', '.join(map(str, bundle.student_steps))} (without exact, "
                          f"steps is a budget)")
    return bundle.student_for_budget(requested)


def allowed(bundle: Bundle, teacher_limit: int | None = None, teacher_off: bool = False,
            bundles: list[str] | None = None) -> dict[str, Any]:
    """What each parameter may be for this bundle on this server (its teacher limit, absent:
    the bundle's teacher_max_steps; or the teacher turned off; the served bundle names): sent
    with every 422."""
    b, k = bundle, bundle.num_labels
    limit = b.teacher_max_steps if teacher_limit is None else teacher_limit
    teacher = ("teacher: turned off on this server (--teacher off)" if teacher_off
               else f"teacher: exact, 1..{limit}")
    return {
        "model": ["student"] if teacher_off else ["student", "teacher"],
        "steps": f"student: a budget >= {b.student_steps[0] if b.student_steps else '-'} "
                 f"(students: {', '.join(map(str, b.student_steps))}); {teacher}",
        "n": f"1..{MAX_N}", "seed": f"0..{MAX_SEED}",
        "label": f"0..{k - 1} or absent (unconditional)" if k else "absent (unconditional model)",
        "format": ["png", "json"],
        "deadline_ms": f"1..{MAX_DEADLINE_MS} or absent", "exact": "true or false (students)",
        "bundle": bundles or [b.name],
    }
