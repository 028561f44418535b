"""`halfstep eval`: quality of the distilled students against the teacher.

Registered by halfstep/cli.py as a plugin; heavy imports stay inside the handler.
"""

from __future__ import annotations

from halfstep.distill.cli_args import positive_ints, positive_ints_or_empty


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="FID, classifier Frechet distance and label accuracy: students vs teacher"
    )
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--data", required=True, help="mnist:DIR (reference = the MNIST test set)")
    p.add_argument(
        "--steps", type=positive_ints_or_empty, default=[1, 2, 4, 8, 16], help="student step counts"
    )
    p.add_argument(
        "--teacher-steps",
        type=positive_ints_or_empty,
        default=[2, 4, 8, 16, 32, 64, 128, 256],
        help="teacher DDIM step counts",
    )
    p.add_argument(
        "--dpm-steps",
        type=positive_ints_or_empty,
        default=[2, 4, 8, 16],
        help="teacher DPM-Solver++ step counts (empty: none)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=2000,
        help="N images per row, labels i %% 10 (a multiple of 10)",
    )
    p.add_argument(
        "--fid-samples",
        type=int,
        default=None,
        help="FID on the first M of the N images of every row (default: N)",
    )
    p.add_argument(
        "--fid-ref-samples",
        type=int,
        default=10000,
        help="test images in the FID reference statistics (cached)",
    )
    p.add_argument("--no-fid", action="store_true", help="skip FID (Inception is slow on CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler call")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="recompute every row (default: reuse rows an earlier run finished, from --cache-dir)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i in every row")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--json", default=None, help="write the results and targets here")
    p.add_argument("--plot", default=None, help="write the quality-vs-steps PNG here")
    p.add_argument("--grids", default=None, help="write one sample grid per step count here")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="classifier and reference statistics (default $HALFSTEP_CACHE or ~/.cache/halfstep)",
    )
    _add_classifier_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    _register_curve(subparsers)


def _add_classifier_options(p) -> None:
    """The classifier flags eval and teacher-curve share."""
    p.add_argument(
        "--classifier",
        default=None,
        help="classifier weights (.safetensors): loaded if present, else trained there "
             "(default: the shipped weights for the default settings and standard MNIST files, "
             "else trained once into the cache)",
    )
    p.add_argument(
        "--classifier-steps",
        type=int,
        default=None,
        help="classifier training steps (default 1200; fewer only for quick checks)",
    )


def _classifier_config(args):
    from .classifier import ClassifierConfig

    if args.classifier_steps is None:
        return ClassifierConfig()
    return ClassifierConfig(steps=args.classifier_steps)


def _register_curve(subparsers) -> None:
    p = subparsers.add_parser(
        "teacher-curve", help="score every EMA snapshot of training runs (quality vs steps)"
    )
    p.add_argument("--run", action="append", required=True, help="training run (repeatable)")
    p.add_argument("--data", required=True, help="mnist:DIR (reference = the MNIST test set)")
    p.add_argument("--samples", type=int, default=500, help="images per snapshot (fixed seeds)")
    p.add_argument("--ddim-steps", type=positive_ints, default=[64],
                   help="teacher DDIM steps, one or several (e.g. 32,64,128,256)")
    p.add_argument("--last", action="store_true", help="only each run's newest snapshot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="classifier cache (as for eval)")
    p.add_argument("--json", default=None,
                   help="write the rows here, after each one; rows it already holds that "
                        "measured the same snapshot the same way are not scored again; at "
                        "the end it holds this run's rows")
    _add_classifier_options(p)
    p.set_defaults(func=cmd_curve)


def cmd_curve(args) -> int:
    import json
    from pathlib import Path

    from halfstep.distill.io import atomic_write_json

    from .curve import teacher_curve
    from .evaluate import default_cache_dir, mnist_dir_from_spec

    out = Path(args.json) if args.json else None
    if out and out.is_dir():
        raise ValueError(f"--json {out} is a folder; pass a file path, e.g. {out}/curve.json")
    done = []
    if out and out.is_file():
        try:
            done = json.loads(out.read_text())
        except ValueError as exc:
            raise ValueError(f"{out} is not a curve's JSON ({exc}); pass another --json") from exc
        if not isinstance(done, list) or not all(isinstance(r, dict) for r in done):
            raise ValueError(f"{out} is not a curve's JSON (a list of rows); pass another --json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    rows = teacher_curve(
        args.run, mnist_dir_from_spec(args.data), args.cache_dir or default_cache_dir(),
        args.samples, args.ddim_steps, args.seed, last=args.last,
        classifier_config=_classifier_config(args), done=done, classifier_path=args.classifier,
        on_row=(lambda so_far: atomic_write_json(out, so_far)) if out else None,
    )
    if out:
        atomic_write_json(out, rows)  # this call's rows: earlier ones it did not measure go
        print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .evaluate import EvalConfig, evaluate
    from .report import check_targets, format_table, format_targets, plot, write_grids, write_json

    clf = _classifier_config(args)
    config = EvalConfig(
        bundle=args.bundle,
        data=args.data,
        steps=args.steps,
        teacher_steps=args.teacher_steps,
        dpm_steps=args.dpm_steps,
        samples=args.samples,
        fid_samples=args.fid_samples,
        fid=not args.no_fid,
        fid_ref_samples=args.fid_ref_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        cache_dir=args.cache_dir or "",
        classifier=args.classifier,
        classifier_config=clf,
        progress=not args.quiet,
        resume=not args.no_resume,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    results = evaluate(config)
    print()
    print(format_table(results))
    print()
    print(format_targets(check_targets(results)))
    print(results["fid"]["note"])
    if args.grids:
        print(f"grids: {', '.join(str(p) for p in write_grids(results, args.grids))}")
    if args.plot:
        print(f"wrote {plot(results, args.plot)}")
    if args.json:
        print(f"wrote {write_json(results, args.json)}")
    return 0
