"""Logging: plain lines for people, one JSON object per line for log collectors (--log-json).

Libraries that install handlers of their own (transformers, torch) are routed through ours, so that every
line has one format; warnings that say nothing to an operator of this server are dropped.
"""

import json
import logging
import sys
import time

# Libraries whose loggers stay at WARNING whatever LOG_LEVEL says (their INFO is per-call noise).
_NOISY = ("httpx", "httpcore", "urllib3", "diffusers", "transformers", "torch", "torchao", "accelerate", "peft")
# Warnings about optional packages this server does not use.
_IRRELEVANT = (
    "requires torchvision (not installed)",  # transformers' image processors fall back to PIL, which we use
    "Detected no triton",  # torchao on a machine without a GPU
    # torchao's optional kernels (MX formats, CUTLASS for Hopper) that its wheel builds for one Python and GPU;
    # the FP8 path (torch._scaled_mm) does not use them
    "/torchao/_C_mxfp8.",
    "/torchao/_C_cutlass_90a.",
    "register_constant() on Enum subclasses is deprecated",  # torchao's, at import
    "Unable to import `torchao` Tensor objects",  # diffusers': for torchao-serialized checkpoints, never loaded here
    # transformers', on every FLUX.2 prompt: diffusers passes padding and truncation to apply_chat_template as
    # keywords, which transformers 5 still applies
    "have to be in `processor_kwargs` dict",
)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class DropIrrelevant(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _IRRELEVANT)


def configure(json_lines: bool, level: str) -> None:
    # First, as it imports torch, transformers and diffusers: their loggers get their own handlers at import,
    # which are taken away below.
    _route_hugging_face()
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(DropIrrelevant())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _NOISY:
        library = logging.getLogger(name)
        library.handlers.clear()  # transformers and torch print through handlers of their own
        library.propagate = True
        library.setLevel(max(logging.WARNING, root.level))


def _route_hugging_face() -> None:
    """transformers and diffusers re-create their handlers on first use unless told not to."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.disable_default_handler()
        library.enable_propagation()
