"""`halfstep serve`: one uvicorn worker for one device; every option also reads HALFSTEP_<NAME>."""

from __future__ import annotations

import argparse

from halfstep.engines.names import BACKENDS

OPTIONS = (  # flag, type, help; each also reads HALFSTEP_<NAME> (flag > env > default)
    ("--bundle", str, "bundle directory (default: the embedded model)"),
    ("--host", str, "address to bind (default 0.0.0.0)"),
    ("--port", int, "port (default 8000)"),
    ("--backend", str, f"{' | '.join(BACKENDS)} (default auto)"),
    ("--max-batch", int, "most images per executed batch (default 64)"),
    ("--max-wait-ms", float, "longest a batch waits for company after its oldest request "
                             "arrived (default 5)"),
    ("--max-wait-fraction", float, "and at most this fraction of the recent batch time of its "
                                   "(model, steps); 0: never wait (default 0.1)"),
    ("--max-queue", int, "queued requests before 503 (default 256)"),
    ("--timeout-s", float, "deadline for a request still queued: 504 after it (default 30)"),
    ("--drain-s", float, "on SIGTERM, finish accepted work for at most this long (default 30)"),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a bundle over HTTP",
        description="Serve a bundle over HTTP. Every option also reads the environment variable "
                    "HALFSTEP_<NAME> (e.g. HALFSTEP_MAX_BATCH); HALFSTEP_API_KEY, read from the "
                    "environment only, makes /generate and /v1/models require a bearer token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, kind, text in OPTIONS:
        env = "HALFSTEP_" + flag[2:].replace("-", "_").upper()
        choices = BACKENDS if flag == "--backend" else None
        p.add_argument(flag, type=kind, default=None, choices=choices, help=f"{text} [{env}]")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .settings import Settings

    settings = Settings.from_env(**{
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag, _, _ in OPTIONS
    })
    return serve(settings)


def onnx_hint(settings, engine_name: str, bundle) -> str | None:
    """Say so when `auto` fell back to eager torch on CPU only for want of ONNX exports."""
    from halfstep.engines.factory import missing_exports_only

    if settings.backend != "auto" or engine_name != "torch" or not missing_exports_only(bundle):
        return None
    return (f"halfstep: hint: this bundle has no ONNX exports, so it runs on eager torch; ONNX "
            f"Runtime is 3-5x faster at batch 1 on CPU: halfstep copy-bundle {bundle.root} DIR "
            f"&& halfstep export --bundle DIR --format onnx && halfstep serve --bundle DIR")


def serve(settings, engine=None) -> int:
    """Build the app (bundle and engine load here, so a bad bundle fails before binding),
    say what is served, then run uvicorn until SIGTERM/SIGINT and a bounded drain."""
    import uvicorn

    from .app import create_app

    app = create_app(settings, engine=engine)
    state = app.state.halfstep
    b = state.bundle
    print(
        f"halfstep: serving bundle {b.name} ({b.root}): students "
        f"{', '.join(map(str, b.student_steps)) or 'none'}, teacher up to {b.teacher_max_steps} "
        f"steps; backend {state.engine.name}, buckets {state.engine.used_buckets()}; "
        f"auth {'on' if settings.api_key else 'off'}; at {settings.url} (playground /, docs /docs)",
        flush=True,
    )
    hint = onnx_hint(settings, state.engine.name, b)
    if hint:
        print(hint, flush=True)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, workers=1, log_level="info",
        timeout_graceful_shutdown=settings.drain_s or None, access_log=False,
    )
    uvicorn.Server(config).run()
    return 0
