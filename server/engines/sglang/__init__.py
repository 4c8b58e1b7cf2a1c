"""ENGINE=sglang: generation by an `sglang serve` child process (see engine.py)."""

from server.engines.sglang.engine import SGLangEngine

__all__ = ["SGLangEngine"]
