"""The real server as a child process, with the tests' defaults (tests/e2e/conftest.py's fixtures start them)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's executables (image-server)
# One demo model for the whole run: built by the first server (or in-process test), reused by the others.
CACHE_DIR = Path(os.environ.get("IMAGE_SERVER_TEST_CACHE", Path(tempfile.gettempdir()) / "image-server-test-cache"))


class ServerProcess(harness.ServerProcess):
    """The bench's launcher with the tests' defaults: the demo model from the shared cache, one torch thread."""

    def __init__(self, env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        self.spool = Path(tempfile.mkdtemp(prefix="image-server-test-spool-"))  # its own, which tests look into
        defaults = {"MODEL_PATH": "demo", "CACHE_DIR": str(CACHE_DIR), "TORCH_THREADS": "1"}
        super().__init__({**defaults, "SPOOL_DIR": str(self.spool), **(env or {})}, command, ready_timeout=120)

    def stop(self) -> int:
        code = super().stop()
        shutil.rmtree(self.spool, ignore_errors=True)
        return code
