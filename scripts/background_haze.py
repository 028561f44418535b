"""How much of a bundle's FID is faint background haze? A diagnostic, not a metric.

    python scripts/background_haze.py score BUNDLE MNIST_DIR [student|ddim] [STEPS]
    python scripts/background_haze.py spread BUNDLE MNIST_DIR ROW [ROW ...] [--samples N]

`score` samples 2,000 images of one row (the eval's seeds and labels) and scores them as
`halfstep eval` does, raw and with every pixel below T/255 set to 0 (real MNIST is about 80%
exact zeros). `spread` describes the background of each ROW (`student:4`, `ddim:64`) on the
first N of those seeds: the share of exact zeros and the standard deviation, in levels of 255,
of the pixels darker than 13/255, the texture that FID weighs and the digit classifier does not.
"""

import argparse

import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.images import to_uint8
from halfstep.eval.evaluate import EvalConfig, make_scorer, row_inputs, sample_row

DARK_LEVEL = 13  # out of 255: background, well below any stroke


def _config(bundle_dir: str, mnist_dir: str, samples: int) -> EvalConfig:
    return EvalConfig(bundle=bundle_dir, data=f"mnist:{mnist_dir}", samples=samples,
                      fid_ref_samples=2000, cache_dir="runs/cache", progress=False)


def _sample(cfg: EvalConfig, method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = Bundle(cfg.bundle)
    noise, labels = row_inputs(cfg, bundle.image_shape)
    images = sample_row(bundle, method, steps, noise, labels, cfg.batch_size, cfg.device, False)
    return images, labels


def score(bundle_dir: str, mnist_dir: str, method: str, steps: int) -> None:
    cfg = _config(bundle_dir, mnist_dir, 2000)
    scorer, _ = make_scorer(cfg, log=lambda _: None)
    images, labels = _sample(cfg, method, steps)
    for t in (0, 4, 16):
        cut = torch.where(images < -1 + 2 * t / 255, torch.full_like(images, -1.0), images)
        zeros = float((to_uint8(cut) == 0).mean())
        r = scorer.score(cut, labels)
        print(f"{method}@{steps} pixels < {t:2d}/255 -> 0: zeros {zeros:.3f}  "
              f"classifier FD {r['fd_classifier']:.3f}  FID {r['fid']:.2f}", flush=True)


def spread(bundle_dir: str, mnist_dir: str, rows: list[str], samples: int) -> None:
    cfg = _config(bundle_dir, mnist_dir, samples)
    print(f"{'row':>12}  zeros  dark pixels  dark spread (levels)")
    for row in rows:
        method, steps = row.split(":")
        levels = to_uint8(_sample(cfg, method, int(steps))[0]).astype("float64")
        dark = levels[levels < DARK_LEVEL]
        print(f"{row:>12}  {(levels == 0).mean():.3f}  {dark.size / levels.size:11.3f}  "
              f"{dark.std():.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score")
    s.add_argument("bundle")
    s.add_argument("mnist_dir")
    s.add_argument("method", nargs="?", default="student", choices=["student", "ddim"])
    s.add_argument("steps", nargs="?", type=int, default=4)
    r = sub.add_parser("spread")
    r.add_argument("bundle")
    r.add_argument("mnist_dir")
    r.add_argument("rows", nargs="+", help="METHOD:STEPS, e.g. student:4 ddim:64")
    r.add_argument("--samples", type=int, default=250)
    a = p.parse_args()
    if a.command == "score":
        score(a.bundle, a.mnist_dir, a.method, a.steps)
    else:
        spread(a.bundle, a.mnist_dir, a.rows, a.samples)


if __name__ == "__main__":
    main()
