"""Helpers for the deployment tests (tests/e2e/test_deploy_*.py)."""

import collections
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The CPU wheelhouse, kept between runs like the demo model cache (download-packages.sh only adds what is missing):
# test_container.py builds the image from it (the same install path the image uses, docker/install.sh).
WHEELHOUSE = Path(os.environ.get("IMAGE_SERVER_TEST_WHEELHOUSE", Path(tempfile.gettempdir()) / "image-server-wheels"))


def tool(name: str) -> str:
    """A tool that scripts/setup.sh --test installs: in the venv (test extras) or on the system (apt)."""
    for candidate in (BIN / name, shutil.which(name), Path("/usr/sbin") / name):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} is missing: scripts/setup.sh --test installs it")


def run(cmd: list, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, output captured as text (stderr folded into stdout), never raising on failure."""
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


_rendered: dict[str, str] = {}


def render(overlay: str) -> str:
    """A kustomize overlay (path from the root) rendered with kubectl, once per test run."""
    if overlay not in _rendered:
        result = run([tool("kubectl"), "kustomize", ROOT / overlay])
        assert result.returncode == 0, result.stdout
        _rendered[overlay] = result.stdout
    return _rendered[overlay]


def objects(overlay: str) -> dict[str, dict]:
    """Rendered objects by kind, and by "kind/name" (a kind may have several: the compile-cache example adds a
    second PersistentVolumeClaim)."""
    docs = [d for d in yaml.safe_load_all(render(overlay)) if d]
    by_kind = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    for d in docs:
        by_kind.setdefault(d["kind"], d)
    return by_kind


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """A hashed requirements file as {name: (version, [sha256, ...])}."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line[0].isspace():
            name, _, version = stripped.rstrip(" \\").partition("==")
            entries[name] = (version, [])
        elif stripped.startswith("--hash=sha256:"):
            entries[name][1].append(stripped.removeprefix("--hash=sha256:").rstrip(" \\"))
    return entries


def lock_subset(path: Path, names: set[str]) -> str:
    """The blocks of a hashed requirements file for `names` only (pins and hashes as they are)."""
    kept, keep = [], False
    for line in path.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            keep = line.split("==")[0] in names
        if keep and not line.strip().startswith("#"):
            kept.append(line)
    return "\n".join(kept) + "\n"


def make_wheel(folder: Path, name: str = "offindex_demo", version: str = "1.0+local", metadata: str = "") -> Path:
    """A minimal pure-Python wheel, standing in for an off-index wheel such as Nunchaku's; `metadata`: more METADATA
    lines (Requires-Dist, Provides-Extra)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{metadata}",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            # A fixed date: the same bytes every run, so the shared wheelhouse (and the image built from it in
            # test_container.py) does not change because a test made its wheel again.
            wheel.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FileServer:
    """A folder served over HTTP on loopback (the off-index wheels' "release page"); counts the GETs per path."""

    def __init__(self, folder: Path) -> None:
        gets = self.gets = collections.Counter()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                gets[urllib.parse.unquote(self.path)] += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
