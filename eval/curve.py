"""A teacher's quality curve: every EMA snapshot of a training run scored on one fixed sample.

`halfstep train --snapshot-every K` keeps `ema-STEP.safetensors`; each is sampled with DDIM on
the same seeds and balanced labels, and scored by the classifier Frechet distance and label
accuracy against the MNIST test set, so steps vs quality shows when training has flattened.
Each row names what it measured (the snapshot's sha256, samples, seed, DDIM steps, classifier),
so an interrupted curve continues from the rows it finished instead of scoring them again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from halfstep.distill.data import load_mnist
from halfstep.distill.denoiser import Denoiser, ModelConfig
from halfstep.distill.io import sha256_file
from halfstep.distill.run_folder import SNAPSHOT
from halfstep.distill.sampling import ddim_sample, noise_for_seeds

from .classifier import classify, load_or_train, scorer_id
from .frechet import FeatureStats, frechet_distance

# The fields that make two rows the same measurement: a finished row is reused only on all.
# Bump VERSION whenever a change to the sampler or the metrics changes the numbers.
VERSION = 1
MEASURED = ("version", "weights_sha256", "model", "ddim_steps", "samples", "seed", "classifier")
SCORES = ("fd_classifier", "label_accuracy", "seconds")


def snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every kept EMA snapshot of a run, in step order."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("ema-*.safetensors")
             if (m := SNAPSHOT.search(p.name))]
    return sorted(found)


def _model_config(run_dir: Path) -> ModelConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run?")
    return ModelConfig.from_dict(json.loads(path.read_text())["model"])


@torch.no_grad()
def score_snapshot(config: ModelConfig, weights: Path, classifier, reference: FeatureStats,
                   samples: int, steps: int, seed: int, batch_size: int = 100) -> dict:
    """DDIM `steps` samples of one snapshot: FD in classifier features and label accuracy."""
    den = Denoiser(config)
    den.unet.load_state_dict(load_file(weights))
    den.eval()
    labels = torch.arange(samples) % max(1, config.num_labels)
    noise = noise_for_seeds([seed + i for i in range(samples)], config.image_shape)
    images = torch.cat([
        ddim_sample(den, noise[i:i + batch_size], labels[i:i + batch_size], steps, den.schedule)
        for i in range(0, samples, batch_size)
    ])
    feats, preds = classify(classifier, images)
    return {"fd_classifier": frechet_distance(reference, FeatureStats.from_features(
                feats.double().numpy())),
            "label_accuracy": float((preds == labels).float().mean())}


def teacher_curve(run_dirs: list[str | Path], mnist_dir: str | Path, cache_dir: str | Path,
                  samples: int = 500, steps: int | list[int] = 64, seed: int = 0, log=print,
                  last: bool = False, classifier_config=None, done: Sequence[dict] = (),
                  on_row=None, classifier_path: str | Path | None = None) -> list[dict]:
    """One row per (run, snapshot, DDIM steps): step, FD-classifier, label accuracy, seconds to
    score. `steps`: one DDIM step count or several (e.g. to see where the teacher's sampler
    comes within 2% of its best); `last`: only each run's newest snapshot; `done`: rows of an
    earlier call, reused where they measured the same thing; `on_row(rows)` after each row,
    with the rows so far and the earlier ones not (yet) measured again, to save;
    `classifier_path`: classifier weights to score with (as `halfstep eval --classifier`)."""
    grid = [steps] if isinstance(steps, int) else list(steps)
    if samples < 10 or not grid or min(grid) < 1:
        raise ValueError("--samples must be >= 10 and --ddim-steps >= 1")
    classifier, info = load_or_train(mnist_dir, cache_dir, classifier_config, classifier_path,
                                     progress=False)
    finished = {_measured(row): row for row in done if _has_scores(row)}
    test = load_mnist(mnist_dir, "test")
    feats, _ = classify(classifier, test.images.float().div(127.5).sub(1.0))
    reference = FeatureStats.from_features(feats.double().numpy())
    rows = []
    for run in map(Path, run_dirs):
        config, found = _model_config(run), snapshots(run)
        model_key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
        if not found:
            raise FileNotFoundError(
                f"no ema-STEP.safetensors in {run}: train with --snapshot-every N"
            )
        for step, path in found[-1:] if last else found:
            sha256 = sha256_file(path)
            for ddim in grid:
                row = {"run": run.name, "step": step, "ddim_steps": ddim, "samples": samples,
                       "seed": seed, "weights_sha256": sha256,
                       "model": model_key.hexdigest()[:16], "classifier": scorer_id(info),
                       "version": VERSION}
                earlier = finished.get(_measured(row))
                if earlier is None:
                    started = time.perf_counter()
                    row.update(score_snapshot(config, path, classifier, reference, samples,
                                              ddim, seed),
                               seconds=round(time.perf_counter() - started, 1))
                else:
                    row.update({k: earlier[k] for k in SCORES})
                log(f"{row['run']:<24} step {step:>6}  DDIM {ddim:>4}  FD-classifier "
                    f"{row['fd_classifier']:8.3f}  label acc {row['label_accuracy']:.4f}  "
                    + ("(earlier run)" if earlier is not None else f"({row['seconds']} s)"))
                rows.append(row)
                if on_row:
                    measured = {_measured(r) for r in rows}
                    on_row(rows + [r for r in done if _measured(r) not in measured])
    return rows


def _measured(row: dict) -> str:
    """The row's measurement as one comparable string (a field an older row lacks: null)."""
    return json.dumps([row.get(k) for k in MEASURED], sort_keys=True, default=str)


def _has_scores(row: dict) -> bool:
    return all(isinstance(row.get(k), (int, float)) for k in SCORES)
