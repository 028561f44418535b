"""`halfstep export --bundle B --format onnx|tensorrt [--steps 1,2,4,8] [--max-batch 64]`,
`halfstep export --bundle B --format diffusers --out DIR [--steps 1,2,4]`.

Thin layer over `export.onnx.export_onnx`, `export.tensorrt.export_tensorrt` and
`export.diffusers.export_diffusers`.
"""

from __future__ import annotations

from halfstep.distill.cli_args import positive_ints


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a bundle's students to ONNX, TensorRT or diffusers pipelines")
    p.add_argument("--bundle", required=True,
                   help="bundle directory (onnx/tensorrt files are added to it)")
    p.add_argument("--format", required=True, choices=("onnx", "tensorrt", "diffusers"))
    p.add_argument("--out", default=None,
                   help="diffusers only: folder for the student-N pipeline folders")
    p.add_argument("--steps", type=positive_ints, default=None,
                   help="students to export, e.g. 1,2,4,8 (default: all)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="largest batch the engine accepts (TensorRT profile max)")
    p.add_argument("--opt-batch", type=int, default=None,
                   help="TensorRT profile opt batch (default: min(8, max-batch))")
    p.add_argument("--fp16", action="store_true",
                   help="TensorRT fp16, kept only within 2/255 pixels of float32")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default=None,
                   help="ONNX exporter (torch.onnx.export dynamo=False/True; default torchscript)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.format == "diffusers":
        if args.fp16 or args.opt_batch is not None or args.exporter or args.opset:
            raise ValueError("--fp16, --opt-batch, --exporter and --opset do not apply to "
                             "--format diffusers")
        if not args.out:
            raise ValueError("--format diffusers needs --out DIR")
        from .diffusers import export_diffusers

        export_diffusers(args.bundle, args.out, args.steps)
        return 0
    if args.out:
        raise ValueError("--out applies to --format diffusers only (other exports go into "
                         "the bundle)")
    if args.format == "onnx":
        if args.fp16 or args.opt_batch is not None:
            raise ValueError("--fp16 and --opt-batch apply to --format tensorrt only")
        from .onnx import DEFAULT_EXPORTER, OPSET, export_onnx

        export_onnx(args.bundle, args.steps, exporter=args.exporter or DEFAULT_EXPORTER,
                    opset=args.opset or OPSET, max_batch=args.max_batch)
        return 0
    if args.exporter or args.opset:
        raise ValueError("--exporter and --opset apply to --format onnx only")
    from .tensorrt import export_tensorrt

    export_tensorrt(args.bundle, args.steps, max_batch=args.max_batch, opt_batch=args.opt_batch,
                    fp16=args.fp16)
    return 0
