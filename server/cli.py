"""`image-server serve`: configure from flags and environment, then serve (server/serve.py).
`image-server demo-assets DIR`: files that let a new user try every plugin on the demo model.

Nothing heavy is imported before a command runs: `--help` and a bad setting answer in a fraction of a second,
and torch, diffusers and the plugins are loaded only to serve or to write the demo assets.
"""

import argparse
import os
import sys
from pathlib import Path

from server import config


def demo_assets(folder: Path) -> int:
    """Each plugin writes what it needs to be tried on the demo model; prints the settings that use them."""
    from server import logs
    from server.plugins import discover

    # before the plugins are imported: the libraries they import warn at import time, in our format too
    logs.configure(os.environ.get("LOG_JSON", "").lower() in ("1", "true", "yes", "on"), "info")
    folder.mkdir(parents=True, exist_ok=True)
    plugins = discover()
    lines = [f"PLUGINS={','.join(name for name, cls in plugins.items() if cls.fields is not None)}"]
    for name, cls in plugins.items():
        lines += cls.demo_assets(folder / name)
    print("\n".join(lines))
    return 0


def parser(sections: dict[str, type]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-server", description="OpenAI Images API server for diffusion models")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve a model",
        description="Serve a model. Every flag also reads the environment variable shown with it.",
    )
    config.add_arguments(serve_parser, sections)
    assets = commands.add_parser("demo-assets", help="write demo LoRAs and a demo NSFW classifier into DIR")
    assets.add_argument("dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    sections = config.plugin_sections()
    args = parser(sections).parse_args(argv)
    if args.command == "demo-assets":
        sys.exit(demo_assets(args.dir))
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = config.load(sections, flags)
    except config.ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"image-server: {line}", file=sys.stderr)
        sys.exit(2)
    from server.serve import serve

    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
