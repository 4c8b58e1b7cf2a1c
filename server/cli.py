"""`image-server serve`: configure from flags and environment, load the model, serve until SIGTERM.
`image-server demo-assets DIR`: files that let a new user try every plugin on the demo model."""

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import uvicorn

from server import config, logs
from server.http import ServerProtocol
from server.plugins import discover

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
        http=ServerProtocol.configured(settings),
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
    server.run()
    return exit_code


def demo_assets(folder: Path) -> int:
    """Each plugin writes what it needs to be tried on the demo model; prints the settings that use them."""
    folder.mkdir(parents=True, exist_ok=True)
    request_plugins = [name for name, cls in discover().items() if cls.fields is not None]
    lines = [f"PLUGINS={','.join(request_plugins)}"]
    for name, cls in discover().items():
        lines += cls.demo_assets(folder / name)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> None:
    # before the plugins are imported: the libraries they import warn at import time, in our format too
    logs.configure(os.environ.get("LOG_JSON", "").lower() in ("1", "true", "yes", "on"), "info")
    parser = argparse.ArgumentParser(prog="image-server", description="OpenAI Images API server for diffusion models")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve a model",
        description="Serve a model. Every flag also reads the environment variable shown with it.",
    )
    sections = {name: cls.Settings for name, cls in discover().items() if cls.Settings is not None}
    config.add_arguments(serve_parser, sections)
    assets = commands.add_parser("demo-assets", help="write demo LoRAs and a demo NSFW classifier into DIR")
    assets.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "demo-assets":
        sys.exit(demo_assets(args.dir))
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = config.load(sections, flags)
    except config.ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"image-server: {line}", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
