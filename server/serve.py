"""`image-server serve` once its settings are checked: take the port, load the model, serve until SIGTERM.

The port is bound first, before anything loads: a port in use is one line and exit code 1, not a model load
cancelled half-way.
"""

import asyncio
import errno
import logging
import os
import signal
import socket

import uvicorn

from server import config, logs
from server.http import ServerProtocol

log = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: readiness goes 503 and new work gets 503 at once, the queue drains, then exit 0.

    uvicorn alone would close the listening socket at the first signal; clients and
    probes would see refused connections instead of answers. A second SIGINT forces.
    """

    def __init__(self, config: uvicorn.Config, drain) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._draining = True
        log.info("received %s: draining", signal.Signals(sig).name)
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound (uvicorn listens on it once the app is built); SystemExit with one line
    naming the address and what to do when it cannot be had."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"image-server: cannot listen on {host}:{port}: {_why(exc)}") from None
    return sock


def _why(exc: OSError) -> str:
    hint = " (is another server running there? Stop it, or choose another with --port or PORT)"
    return (exc.strerror or str(exc)).lower() + (hint if exc.errno == errno.EADDRINUSE else "")


def set_torch_threads(settings: config.Settings) -> int:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = settings.torch_threads or max(1, cpus // max(1, settings.num_gpu_instances))
    torch.set_num_threads(threads)
    return threads


def serve(settings: config.Settings) -> int:
    sock = bind(settings.host, settings.port)
    logs.configure(settings.log_json, settings.log_level)
    if not settings.allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = set_torch_threads(settings)
    host, port = sock.getsockname()[:2]  # PORT=0: the port the system chose
    log.info("image-server: model=%s engine=%s torch threads=%d, on http://%s:%d", settings.model, settings.engine,
             threads, host, port)  # fmt: skip

    from server.app import create_app

    app = create_app(settings)
    uv_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=ServerProtocol.configured(settings, app.state.metrics.dropped),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(5, int(settings.drain_timeout) + 5),
        timeout_keep_alive=int(settings.keep_alive),
    )
    server = DrainingServer(uv_config, app.state.drain)
    exit_code = 0

    def fatal() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app.state.on_fatal = fatal
    server.run(sockets=[sock])
    return exit_code
