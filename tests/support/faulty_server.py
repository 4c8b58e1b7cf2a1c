"""`image-server serve` whose engine fails on prompts containing EXPLODE.

A stand-in for what cannot be provoked on this machine (a CUDA out-of-memory
error, a kernel fault): everything else is the real server and the real
diffusers engine.
"""

from server.cli import main
from server.engines.diffusers import DiffusersEngine

_generate = DiffusersEngine.generate


def generate(self, specs, progress):
    if any("EXPLODE" in spec.prompt for spec in specs):
        raise RuntimeError("injected engine failure at /srv/models/flux/transformer (a path callers must not see)")
    return _generate(self, specs, progress)


DiffusersEngine.generate = generate

if __name__ == "__main__":
    main()
