"""Engines generate images; everything around generation lives outside them (see base.py: `Engine`)."""

from server.config import Settings
from server.engines.base import Engine


def create_engine(settings: Settings) -> Engine:
    if settings.engine == "sglang":
        from server.engines.sglang import SGLangEngine

        return SGLangEngine(settings)
    from server.engines.diffusers import DiffusersEngine

    return DiffusersEngine(settings)
