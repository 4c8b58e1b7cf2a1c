"""Engines generate images; everything around generation lives outside them.

An engine has: `name` (the model id), `info` (how it runs, shown in
/v1/models), `can_batch` (whether several requests may share a call),
`load()`, `warmup()`, `defaults()` -> (steps, guidance), and
`generate(specs, should_stop)` -> one list of images per spec, called on the
engine thread only.
"""

from server.config import Settings


def create_engine(settings: Settings):
    if settings.engine == "sglang":
        from server.engines.sglang import SGLangEngine

        return SGLangEngine(settings)
    from server.engines.diffusers import DiffusersEngine

    return DiffusersEngine(settings)
