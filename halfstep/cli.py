"""The `halfstep` command: a thin dispatcher; the library does the work.

Each subcommand registers its arguments here and calls one library function. Expected
failures (bad input, missing files) print one line `halfstep: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from halfstep import __version__
from halfstep.distill.cli_args import (
    positive_ints,
    round_iterations,
    round_learning_rates,
    student_from_bundle,
)
from halfstep.distill.data_args import add_folder_options
from halfstep.distill.graceful_stop import Stopped, graceful_stop


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a teacher diffusion model")
    p.add_argument(
        "--data", required=True, help="mnist:DIR | folder:DIR[?channels=C&size=N] | synthetic[:N]"
    )
    add_folder_options(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, config, samples)")
    p.add_argument("--preset", default="tiny", help="tiny | mnist | cifar32")
    p.add_argument("--parameterization", default=None, help="v (default) | x | eps | both")
    p.add_argument("--weighting", default=None, help="snr_trunc (default) | snr_plus_one | snr")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument(
        "--norm-groups", type=int, help="GroupNorm groups (default: the preset's)"
    )
    p.add_argument(
        "--widths",
        type=positive_ints,
        help="channels of each UNet level, e.g. 64,128,128 (default: the preset's; each "
        "level halves the image size)",
    )
    p.add_argument(
        "--layers-per-block",
        type=int,
        help="residual blocks per UNet level (default: the preset's)",
    )
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument(
        "--snapshot-every",
        type=int,
        help="also keep the EMA weights every N steps as ema-STEP.safetensors (a quality curve)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt; where OUT holds no run yet, start it",
    )
    p.add_argument(
        "--reset-ema",
        action="store_true",
        help="with --resume: restart the EMA from the current weights",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from halfstep.distill.data import load_dataset, resolved_spec
    from halfstep.distill.data_args import train_data_spec
    from halfstep.distill.train import TrainConfig, dist_info, init_distributed_from_env, train

    init_distributed_from_env()
    spec = train_data_spec(args.data, args.channels, args.image_size)
    dataset = load_dataset(spec)
    cfg = TrainConfig.from_preset(
        args.preset,
        resolved_spec(spec, dataset),
        args.out,
        dataset.image_shape,
        dataset.num_labels,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every,
        snapshot_every=args.snapshot_every,
        seed=args.seed,
        weighting=args.weighting,
    )
    if args.parameterization:
        cfg.model.parameterization = args.parameterization
    if args.norm_groups:
        cfg.model.norm_num_groups = args.norm_groups
    if args.widths:
        cfg.model.block_out_channels = tuple(args.widths)
    if args.layers_per_block is not None:
        if args.layers_per_block < 1:
            raise UsageError(f"--layers-per-block must be >= 1, got {args.layers_per_block}")
        cfg.model.layers_per_block = args.layers_per_block
    try:
        cfg.model.__post_init__()
    except ValueError as e:
        raise UsageError(str(e)) from None
    del dataset
    if args.reset_ema and not args.resume:
        raise UsageError("--reset-ema only applies with --resume")
    with graceful_stop():
        out = train(cfg, resume=args.resume, reset_ema=args.reset_ema)
    if dist_info()[0] == 0:
        print(f"teacher written to {out}", flush=True)
    return 0


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="progressive distillation: teacher run -> bundle")
    p.add_argument("--teacher", required=True, help="training run directory")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--from-steps", type=int, default=256)
    p.add_argument("--to-steps", type=int, default=1)
    p.add_argument("--iters-per-round", type=int, default=300)
    p.add_argument(
        "--round-iters",
        type=round_iterations,
        default={},
        metavar="STEPS=ITERS,...",
        help="per-round overrides by the student's step count, e.g. 4=500,2=1000,1=1000",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of every round")
    p.add_argument(
        "--round-lr",
        type=round_learning_rates,
        default={},
        metavar="STEPS=LR,...",
        help="per-round peak learning rates by the student's step count, e.g. 128=5e-5,64=5e-5",
    )
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="fraction of labels replaced by 'no label', keeping unconditional sampling (0.1)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="defaults to the teacher's training data; folder data is read at the teacher's "
        "channels and image size unless --channels / --image-size say otherwise",
    )
    add_folder_options(p)
    p.add_argument("--name", default=None, help="bundle name (default: the directory name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--probe-seeds",
        type=int,
        default=64,
        help="fixed seeds on which each round's gap to its teacher is measured and logged (64)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=250,
        metavar="ITERS",
        help="save the running round's state every ITERS iterations, for --resume (250)",
    )
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: after its last finished round, inside the "
                        "running round from its last save")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from halfstep.distill.data_args import distill_data_spec
    from halfstep.distill.progressive import DistillConfig, distill_run

    cfg = DistillConfig(
        teacher=args.teacher,
        out=args.out,
        from_steps=args.from_steps,
        to_steps=args.to_steps,
        iters_per_round=args.iters_per_round,
        round_iters=args.round_iters,
        batch_size=args.batch_size,
        lr=args.lr,
        round_lr=args.round_lr,
        label_dropout=args.label_dropout,
        data=distill_data_spec(args.data, args.channels, args.image_size, args.teacher),
        name=args.name,
        seed=args.seed,
        probe_size=args.probe_seeds,
        checkpoint_every=args.checkpoint_every,
    )
    with graceful_stop():
        distill_run(cfg, resume=args.resume)
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a bundle into a PNG grid")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded one)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="student: a budget, the largest student <= STEPS runs (default: the largest); "
        "teacher: exact (default: its default steps)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="student: require a student of exactly --steps steps instead of a budget",
    )
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None)
    p.add_argument("--model", choices=("student", "teacher"), default="student")
    p.add_argument("--sampler", choices=("ddim", "ancestral"), default="ddim")
    p.add_argument("--backend", default="torch", help="torch | cudagraph | onnxruntime | tensorrt")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from halfstep.distill.sample import resolve_steps, sample_images, write_grid
    from halfstep.engines.factory import make_engine
    from halfstep.server.embedded import load_bundle

    bundle = load_bundle(args.bundle)
    steps = resolve_steps(bundle, args.model, args.steps, exact=args.exact)
    if args.steps is None:
        why = "the largest student" if args.model == "student" else "the teacher's default"
    elif args.model == "student" and not args.exact:
        why = f"the largest student <= {args.steps}"
    else:
        why = "exact"
    print(f"{args.model}: {steps} steps ({why})")
    engine = None if args.sampler == "ancestral" else make_engine(bundle, args.backend)
    images = sample_images(
        bundle,
        steps,
        n=args.n,
        seed=args.seed,
        label=args.label,
        model=args.model,
        sampler=args.sampler,
        engine=engine,
    )
    print(f"wrote {write_grid(images, args.out)}")
    return 0


def _add_bundle(sub) -> None:
    from halfstep.distill.bundle_teacher import DEFAULT_STEPS, MAX_STEPS

    p = sub.add_parser(
        "bundle", help="a trained teacher alone as a bundle: serve or evaluate it before distilling"
    )
    p.add_argument("--teacher", required=True, help="training run directory (halfstep train)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    p.add_argument("--default-steps", type=int, default=DEFAULT_STEPS,
                   help="DDIM steps of a request that names none (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS,
                   help="the most DDIM steps a request may ask for (default: %(default)s)")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args) -> int:
    from halfstep.distill.bundle_teacher import bundle_teacher

    out = bundle_teacher(args.teacher, args.out, args.name, args.default_steps, args.max_steps)
    print(f"wrote {out} (teacher only; distill the run into another --out for students)")
    return 0


def _add_copy_bundle(sub) -> None:
    p = sub.add_parser(
        "copy-bundle",
        help="copy a bundle, keeping only some students, taking some from other bundles, or "
             "storing its weights as float16",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--students", type=positive_ints, default=None,
                   help="students to keep, e.g. 1,2,4,8,16 (default: all, and the taken ones)")
    p.add_argument("--take", action="append", type=student_from_bundle, default=[],
                   metavar="STEPS=BUNDLE",
                   help="student STEPS from another bundle of the same teacher instead of SRC's, "
                        "e.g. 1=runs/longer-last-round (repeatable)")
    p.add_argument("--dtype", default=None, metavar="float16|bfloat16|float32",
                   help="store every weight file as this type (float16: half the size; the "
                        "model still runs in float32); default: as in SRC")
    p.set_defaults(func=cmd_copy_bundle)


def cmd_copy_bundle(args) -> int:
    from halfstep.distill.bundle_copy import copy_bundle

    take = dict(args.take)
    if len(take) < len(args.take):
        raise UsageError("--take names the same student twice")
    print(f"wrote {copy_bundle(args.src, args.dst, args.students, take, args.dtype)}")
    return 0


def _add_import_diffusers(sub) -> None:
    p = sub.add_parser(
        "import-diffusers",
        help="a diffusers UNet2DModel + DDPM/DDIM scheduler (save_pretrained) as a teacher run",
    )
    p.add_argument("src", help="directory with the UNet and scheduler_config.json (or unet/, "
                               "scheduler/ sub-folders)")
    p.add_argument("--out", required=True, help="run directory to write (for distill --teacher)")
    p.add_argument("--data", default="", help="data spec recorded for distill (else pass "
                                              "distill --data)")
    p.set_defaults(func=cmd_import_diffusers)


def cmd_import_diffusers(args) -> int:
    from halfstep.distill.diffusers_import import import_diffusers

    print(f"teacher run written to {import_diffusers(args.src, args.out, args.data)}")
    return 0


# Later stages register their own subcommands: each module has `register(subparsers)`.
PLUGIN_MODULES = (
    "halfstep.export.cli",
    "halfstep.server.cli",
    "halfstep.bench.cli",
    "halfstep.eval.cli",
)


def _plugins():
    import importlib

    for name in PLUGIN_MODULES:
        try:
            yield importlib.import_module(name).register
        except ModuleNotFoundError as exc:
            if not (exc.name and name.startswith(exc.name)):  # a real missing dependency
                raise


SUBCOMMANDS = [
    _add_train, _add_distill, _add_sample, _add_bundle, _add_copy_bundle, _add_import_diffusers
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halfstep", description="Progressive distillation and low-latency serving."
    )
    parser.add_argument("--version", action="version", version=f"halfstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in [*SUBCOMMANDS, *_plugins()]:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("halfstep: interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:  # SIGTERM: the state is saved, --resume continues
        print(f"halfstep: {exc}", file=sys.stderr)
        return exc.exit_code
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"halfstep: error: {exc}", file=sys.stderr)
        return 2
