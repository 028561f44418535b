"""How much of a bundle's FID is faint background haze? Samples N images of one row (the
eval's seeds and labels) and scores them as `halfstep eval` does, raw and with every pixel
below T/255 set to 0 (real MNIST is about 80% exact zeros). A diagnostic, not a metric.

    python scripts/background_haze.py BUNDLE MNIST_DIR [student|ddim] [STEPS]
"""

import sys

import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.images import to_uint8
from halfstep.eval.evaluate import EvalConfig, make_scorer, row_inputs, sample_row


def main(bundle_dir: str, mnist_dir: str, method: str = "student", steps: int = 4) -> None:
    cfg = EvalConfig(bundle=bundle_dir, data=f"mnist:{mnist_dir}", samples=2000,
                     fid_ref_samples=2000, cache_dir="runs/cache", progress=False)
    scorer, _ = make_scorer(cfg, log=lambda _: None)
    bundle = Bundle(bundle_dir)
    noise, labels = row_inputs(cfg, bundle.image_shape)
    images = sample_row(bundle, method, steps, noise, labels, cfg.batch_size, cfg.device, False)
    for t in (0, 4, 16):
        cut = torch.where(images < -1 + 2 * t / 255, torch.full_like(images, -1.0), images)
        zeros = float((to_uint8(cut) == 0).mean())
        r = scorer.score(cut, labels)
        print(f"{method}@{steps} pixels < {t:2d}/255 -> 0: zeros {zeros:.3f}  "
              f"classifier FD {r['fd_classifier']:.3f}  FID {r['fid']:.2f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3], *sys.argv[3:4], *(int(a) for a in sys.argv[4:5]))
