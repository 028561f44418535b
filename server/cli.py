"""`halfstep serve`: one uvicorn worker for one device; every option also reads HALFSTEP_<NAME>."""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

from halfstep.engines.names import BACKENDS

from .settings import parse_bool


def bool_arg(raw: str) -> bool:
    """argparse type for a boolean option: parse_bool, its error shown as is."""
    try:
        return parse_bool(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


OPTIONS = (  # flag, type, help; each also reads HALFSTEP_<NAME> (flag > env > default)
    ("--bundle", str, "bundle directory, or NAME=DIR; repeat it to serve several (the first is "
                      "the default of /generate; env for several: HALFSTEP_BUNDLES=NAME=DIR,...)"
                      " (default: the embedded model)"),
    ("--host", str, "address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                    "interface, as the container image sets)"),
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
    ("--max-backlog-s", float, "bound on queued work in seconds of engine time; 0 = unbounded "
                               "(default 0)"),
    ("--max-teacher-steps", int, "most steps a model=teacher request may ask for (default: the "
                                 "bundle's teacher default steps)"),
    ("--teacher", str, "on | off: off refuses model=teacher with 422 (default on)"),
    ("--max-request-s", float, "most predicted engine seconds one request may cost (n x steps "
                               "x seconds per image-step); over it: 422 (default 60)"),
    ("--watchdog-factor", float, "a batch running over this many times its predicted time (and "
                                 "at least 5 s) fails with 503 and turns /healthz to 503 "
                                 "(default 10)"),
    ("--auth-metrics", bool_arg, "true | false: /metrics needs the bearer token too, when "
                                 "HALFSTEP_API_KEY is set (default false)"),
)
CHOICES = {"--backend": BACKENDS, "--teacher": ("on", "off")}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a bundle over HTTP",
        description="Serve a bundle over HTTP. Every option also reads the environment variable "
                    "HALFSTEP_<NAME> (e.g. HALFSTEP_MAX_BATCH); HALFSTEP_API_KEY, read from the "
                    "environment only, makes /generate, /v1/* and /v2/* require a bearer token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, kind, text in OPTIONS:
        env = "HALFSTEP_" + flag[2:].replace("-", "_").upper()
        choices = CHOICES.get(flag)
        many = {"action": "append"} if flag == "--bundle" else {}
        p.add_argument(flag, type=kind, default=None, choices=choices, help=f"{text} [{env}]",
                       **many)
    p.add_argument("--no-export-cache", dest="export_cache", action="store_false", default=None,
                   help="with --backend auto on CPU, serve a bundle without ONNX exports on eager "
                        "torch instead of on a copy exported once into $HALFSTEP_CACHE/exports "
                        f"(default: the copy) [{EXPORT_CACHE_ENV}=false]")
    p.set_defaults(func=cmd_serve)


EXPORT_CACHE_ENV = "HALFSTEP_EXPORT_CACHE"


def export_cache_enabled(flag: bool | None, environ=None) -> bool:
    """--no-export-cache > HALFSTEP_EXPORT_CACHE > on."""
    if flag is not None:
        return flag
    raw = (os.environ if environ is None else environ).get(EXPORT_CACHE_ENV)
    if raw is None or not raw.strip():
        return True
    try:
        return parse_bool(raw)
    except ValueError:
        raise ValueError(f"{EXPORT_CACHE_ENV}={raw!r} is not a boolean: use true/false, 1/0, "
                         "yes/no or on/off") from None


def cmd_serve(args) -> int:
    from .settings import Settings

    values = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
              for flag, _, _ in OPTIONS}
    bundles = values.pop("bundle")  # every --bundle, in order (None: from the environment)
    settings = Settings.from_env(**values, bundles=tuple(bundles) if bundles else None)
    status = serve(settings, export_cache=export_cache_enabled(getattr(args, "export_cache",
                                                                       None)))
    leave(status)
    return status  # not reached


def leave(status: int) -> None:
    """End the process now, without interpreter finalisation: the engine thread is a daemon
    and may still be inside torch (a warm-up cut short by SIGTERM), and finalising under it
    aborts in the C++ runtime. Output and log handlers are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def onnx_hint(settings, engine_name: str, bundle) -> str | None:
    """Say so when `auto` fell back to eager torch on CPU only for want of ONNX exports."""
    from halfstep.engines.factory import missing_exports_only

    if settings.backend != "auto" or engine_name != "torch" or not missing_exports_only(bundle):
        return None
    return (f"halfstep: hint: this bundle has no ONNX exports, so it runs on eager torch; ONNX "
            f"Runtime is 3-5x faster at batch 1 on CPU: halfstep copy-bundle {bundle.root} DIR "
            f"&& halfstep export --bundle DIR --format onnx && halfstep serve --bundle DIR (or "
            f"let serve export it once: leave out --no-export-cache / {EXPORT_CACHE_ENV}=false)")


def serving_line(state, d) -> str:
    """What `serve` prints for one served bundle."""
    from .admission import teacher_limit

    b = d.bundle
    teacher = ("teacher off" if state.settings.teacher == "off"
               else f"teacher up to {teacher_limit(state, d)} steps")
    exported = f" (its ONNX-exported copy of {d.exported_from}, cached)" if d.exported_from else ""
    default = " (default)" if d.name == state.default and len(state.deployments) > 1 else ""
    return (f"halfstep: serving bundle {d.name}{default} from {b.root}{exported}: students "
            f"{', '.join(map(str, b.student_steps)) or 'none'}, {teacher}; backend "
            f"{d.engine.name}, buckets {d.engine.used_buckets()}")


class PortInUse(ValueError):
    """The port is taken (or the address cannot be bound): one line, exit status 2."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for (host, port), made before the bundle loads so that a taken port
    fails at once. Raises PortInUse saying what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is in use (another process listens on {host}:{port}; "
                            f"stop it or pick another port with --port or HALFSTEP_PORT)") from None
        raise PortInUse(f"cannot bind {host}:{port} ({exc.strerror or exc}; set --host or "
                        f"HALFSTEP_HOST to an address of this machine)") from None
    return sock


def bound_url(sock: socket.socket) -> tuple[str, str]:
    """(the address really bound as host:port, a URL to open from this machine)."""
    host, port = sock.getsockname()[:2]
    wildcard = host in ("0.0.0.0", "::")
    shown = f"[{host}]" if ":" in host else host
    local = "127.0.0.1" if host == "0.0.0.0" else "[::1]" if host == "::" else shown
    return f"{shown}:{port}" + (" (all interfaces)" if wildcard else ""), f"http://{local}:{port}"


def exposure_warning(address: str, api_key: str | None) -> str | None:
    """One warning line when `address` is reachable from other machines and no key is set."""
    if api_key or ipaddress.ip_address(address.split("%")[0]).is_loopback:
        return None
    shown = "all interfaces" if address in ("0.0.0.0", "::") else address
    return (f"halfstep: warning: serving on {shown} without HALFSTEP_API_KEY: anyone who can "
            f"reach this port can generate images")


def log_config() -> dict:
    """uvicorn's logging, with the halfstep loggers (warm-up, drain, stop) on its handler and
    the request id (or "-") on every line."""
    from uvicorn.config import LOGGING_CONFIG

    from .access_log import with_request_id

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["halfstep"] = {"handlers": ["default"], "level": "INFO",
                                     "propagate": False}
    return with_request_id(config)


def serve(settings, engine=None, export_cache: bool | None = None) -> int:
    """Bind the port (a taken one fails here, in well under a second), build the app (bundle
    and engine load here, so a bad bundle fails before serving; on CPU with --backend auto a
    bundle without ONNX exports is served from its cached exported copy, see
    `app.served_bundle`), say what is served and where, then run uvicorn until SIGTERM/SIGINT
    and a bounded drain; returns 0. `halfstep serve` then ends the process with `leave`."""
    sock = bind_socket(settings.host, settings.port)  # before the heavy imports below
    try:
        import uvicorn

        from .app import create_app

        app = create_app(settings, engine=engine,
                         export_cache=export_cache_enabled(export_cache))
    except BaseException:
        sock.close()
        raise
    state = app.state.halfstep
    where, url = bound_url(sock)
    lines = [serving_line(state, d) for d in state.deployments.values()]
    lines[-1] += (f"; auth {'on' if settings.api_key else 'off'}; at {url} (bound to {where}; "
                  f"playground /, docs /docs)")
    print("\n".join(lines), flush=True)
    warning = exposure_warning(sock.getsockname()[0], settings.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    for d in state.deployments.values():
        hint = onnx_hint(settings, d.engine.name, d.bundle)
        if hint:
            print(hint, flush=True)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app, host=host, port=port, workers=1, log_level="info", log_config=log_config(),
        timeout_graceful_shutdown=settings.drain_s, access_log=False,
    )
    with quiet_signals():
        draining_server(config, state).run(sockets=[sock])
    sock.close()
    return 0


DRAIN_GRACE_S = 0.5  # after the engine's work: for responses still being encoded and sent


def draining_server(config, state=None):
    """uvicorn's server, draining on the first SIGINT/SIGTERM: at once not ready, and new work
    (still accepted on the open port) answered 503 Draining with Retry-After; once the accepted
    work is done, or drain_s is over, uvicorn's own shutdown runs (it waits for responses in
    flight, then the lifespan fails what is still queued). A second signal stops at once: every
    accepted request is answered 503 Draining and the shutdown (lifespan included) runs with no
    drain left. (uvicorn's own force exit would cancel the request and lifespan tasks instead:
    500s and CancelledError tracebacks.)"""
    import asyncio

    import uvicorn

    from .outcomes import Draining

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame) -> None:
            if state is None:
                super().handle_exit(sig, frame)
                return
            if self.draining or self.should_exit:
                self.stop_now()
                return
            self.draining = True
            state.begin_drain()
            logging.getLogger("halfstep.server").info(
                "shutting down: finishing %d requests in flight (at most %g s; "
                "Ctrl-C again stops at once)", len(self.server_state.tasks), state.drain_left_s())

        def stop_now(self) -> None:
            """The second signal: no drain left; what was accepted is answered 503 now (on the
            event loop: this runs in a signal handler), and on_tick or the shutdown already
            under way ends the process within DRAIN_GRACE_S of the last answer."""
            self.draining = True
            state.end_drain_now()
            logging.getLogger("halfstep.server").info(
                "stopping at once: answering %d requests 503", len(self.server_state.tasks))
            b = state.batcher
            if b is not None:
                with contextlib.suppress(RuntimeError):  # no running loop: nothing accepted
                    asyncio.get_running_loop().call_soon_threadsafe(
                        b.fail_all, Draining("server stopped at once before this request was done"))

        quiet_ticks = 0

        async def on_tick(self, counter: int) -> bool:
            if self.draining and not self.should_exit:
                left, b = state.drain_left_s(), state.batcher
                done = b is None or (b.idle and not self.server_state.tasks)
                self.quiet_ticks = self.quiet_ticks + 1 if done else 0
                if left <= 0 and b is not None:  # out of time: answer the rest 503 now
                    b.fail_all(Draining("server shut down before this request was done"))
                if left <= 0 or self.quiet_ticks >= 2:  # idle for a tick: no reply in flight
                    self.config.timeout_graceful_shutdown = left + DRAIN_GRACE_S
                    self.should_exit = True
            return await super().on_tick(counter)

    return Server(config)


@contextlib.contextmanager
def quiet_signals():
    """After a graceful stop uvicorn raises the signal again, which would end the process
    with a traceback (SIGINT) or a signal status (SIGTERM); here it is absorbed, so the
    command exits 0 with no traceback."""
    if threading.current_thread() is not threading.main_thread():  # uvicorn skips them too
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
