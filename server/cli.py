"""`image-server serve`: configure from flags and environment, load the model, serve until SIGTERM."""

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvicorn

from server import config, logs

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


def set_torch_threads(settings: config.Settings) -> int:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = settings.torch_threads or max(1, cpus // max(1, settings.num_gpu_instances))
    torch.set_num_threads(threads)
    return threads


def serve(settings: config.Settings) -> int:
    logs.configure(settings.log_json, settings.log_level)
    if not settings.allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = set_torch_threads(settings)
    log.info("image-server: model=%s engine=%s torch threads=%d", settings.model, settings.engine, threads)

    from server.app import create_app

    app = create_app(settings)
    uv_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(5, int(settings.drain_timeout)),
        timeout_keep_alive=75,  # longer than nginx's and most load balancers' idle timeouts
    )
    server = DrainingServer(uv_config, app.state.service.drain)
    exit_code = 0

    def fatal() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app.state.on_fatal = fatal
    server.run()
    return exit_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="image-server", description="OpenAI Images API server for diffusion models")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve a model",
        description="Serve a model. Every flag also reads the environment variable shown with it.",
    )
    config.add_arguments(serve_parser)
    args = parser.parse_args(argv)
    sys.exit(serve(config.from_namespace(args)))


if __name__ == "__main__":
    main()
