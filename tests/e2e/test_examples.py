"""The scripts in examples/ run unchanged against the real server (curl and the openai SDK), and so do the
README's first-hour commands."""

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bench.harness import free_port, wait_ready
from server import config
from tests.support.images import gradient, mask_png
from tests.support.server import CACHE_DIR, ROOT
from tests.support.tools import bench_tool


def run(server, *args: str, cwd) -> str:
    env = {**os.environ, "BASE_URL": server.url, "OPENAI_API_KEY": "none"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_curl_generate(server, tmp_path):
    run(server, "bash", str(ROOT / "examples/generate.sh"), "out.jpeg", cwd=tmp_path)
    image = Image.open(tmp_path / "out.jpeg")
    assert (image.format, image.size) == ("JPEG", (512, 512))


def test_curl_edit_with_and_without_mask(server, tmp_path):
    gradient(256, 256).save(tmp_path / "in.png")
    (tmp_path / "mask.png").write_bytes(mask_png())
    run(server, "bash", str(ROOT / "examples/edit.sh"), "in.png", "", "plain.png", cwd=tmp_path)
    run(server, "bash", str(ROOT / "examples/edit.sh"), "in.png", "mask.png", "masked.png", cwd=tmp_path)
    for name in ("plain.png", "masked.png"):
        image = Image.open(tmp_path / name)
        assert (image.format, image.size) == ("PNG", (256, 256))


def test_sdk_generate(server, tmp_path):
    out = run(server, sys.executable, str(ROOT / "examples/generate.py"), "fox", cwd=tmp_path)
    assert "seed 42" in out and "seed 43" in out
    for i in (0, 1):
        assert Image.open(tmp_path / f"fox-{i}.png").size == (512, 512)


def test_sdk_edit(server, tmp_path):
    gradient(320, 256).save(tmp_path / "in.png")
    (tmp_path / "mask.png").write_bytes(mask_png((320, 256)))
    run(server, sys.executable, str(ROOT / "examples/edit.py"), "in.png", "mask.png", "out.png", cwd=tmp_path)
    assert Image.open(tmp_path / "out.png").size == (320, 256)


def test_curl_stream(server, tmp_path):
    out = run(server, "bash", str(ROOT / "examples/stream.sh"), "lighthouse", cwd=tmp_path)
    assert out.splitlines() == [
        "image_generation.partial_image lighthouse-partial-0.jpeg",
        "image_generation.partial_image lighthouse-partial-1.jpeg",
        "image_generation.completed lighthouse.jpeg",
    ]
    sizes = {Image.open(tmp_path / name).size for name in os.listdir(tmp_path)}
    assert sizes == {(512, 512)}


# -- the README's first hour, as written (ports and scratch folders substituted) ---------------------------------


def readme_blocks(heading: str) -> list[str]:
    """The bash blocks of the README section under `heading` (up to the next heading)."""
    text = "\n" + (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    end = re.compile(r"\n#{1,3} ").search(text, start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start : end.start() if end else None], re.S)


def commands(block: str) -> list[str]:
    """A block's commands, continuation lines joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def in_here(command: str) -> str:
    """A command meant for the repository's folder, to run in a scratch folder (where it writes its images)."""
    return command.replace(" examples/", f" {ROOT}/examples/")


def shell(command: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, command + "\n" + done.stdout + done.stderr
    return done.stdout


def test_the_first_screen_sets_up_then_the_first_curl_writes_an_image(server, tmp_path):
    setup, first_curl = readme_blocks("# image-server")[:2]
    assert [c.split()[0] for c in commands(setup)] == ["scripts/demo.sh", "scripts/test.sh"]
    (command,) = commands(first_curl)
    out = shell(in_here(command).replace("localhost:8000", server.url.removeprefix("http://")), tmp_path)
    assert out.startswith('wrote lighthouse.jpeg (512x512): {"seed": ')
    image = Image.open(tmp_path / "lighthouse.jpeg")
    assert (image.format, image.size) == ("JPEG", (512, 512))


def test_try_the_plugins_beside_the_demo_server_then_the_upload_trial(tmp_path):
    """The plugin server of "Try the plugins" takes another port than the demo server (which scripts/demo.sh starts
    on the default port), and everything in the section works: demo assets, the server, a request through three
    plugins, and scripts/try-upload.sh's local S3 with the request it prints."""
    start, requests = readme_blocks("### Try the plugins")
    (port,) = re.findall(r"--port (\d+)", start)
    assert int(port) != config.Settings.port  # the demo server's
    (s3,) = re.findall(r"UPLOAD_ALLOWED_HOSTS=127.0.0.1:(\d+)", start)
    assert int(s3) == bench_tool("loopback_s3").parse_args([]).s3_port  # where scripts/try-upload.sh puts it
    mine, my_s3 = str(free_port()), str(free_port())
    serve = start.replace(f"--port {port}", f"--port {mine}").replace(f"127.0.0.1:{s3}", f"127.0.0.1:{my_s3}")
    serve = serve.replace("/tmp/demo-assets", str(tmp_path / "assets"))
    env = {**os.environ, "CACHE_DIR": str(CACHE_DIR), "TORCH_THREADS": "1"}  # what the README leaves to defaults
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        plugin_server = subprocess.Popen(
            ["bash", "-c", serve], cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_ready(f"http://127.0.0.1:{mine}", plugin_server, 180, log.read_text)
        request, trial = commands(requests)
        out = shell(in_here(request).replace(f"localhost:{port}", f"127.0.0.1:{mine}"), tmp_path)
        assert out.startswith("wrote fox.jpeg (512x512): ") and '"nsfw": ' in out
        assert Image.open(tmp_path / "fox.jpeg").size == (512, 512)
        assert trial.split()[0] == "scripts/try-upload.sh"
        upload_trial([trial.split()[0], "--port", mine, "--s3-port", my_s3], commands(serve)[1], tmp_path)
    finally:
        os.killpg(plugin_server.pid, signal.SIGTERM)
        plugin_server.wait(60)


def assignments(command: str) -> dict[str, str]:
    """The VARIABLE=value settings a command line starts with."""
    words = shlex.split(command)
    return dict(w.split("=", 1) for w in itertools.takewhile(lambda w: re.match(r"[A-Z_]+=", w), words))


def upload_trial(command: list[str], readme_serve: str, tmp_path: Path) -> None:
    """scripts/try-upload.sh: the README's server has the settings it asks for, and the curl it prints uploads."""
    tool = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        printed = []
        while not printed or printed[-1] != "Waiting for uploads...":
            printed.append(tool.stdout.readline().rstrip("\n"))
            assert printed[-1] or tool.poll() is None, printed
        (serve,) = [line for line in printed if "image-server serve" in line]
        wanted, readme = assignments(serve.strip()), assignments(readme_serve)
        assert set(wanted.pop("PLUGINS").split(",")) <= set(readme.pop("PLUGINS").split(","))
        assert wanted.items() <= readme.items()  # UPLOAD_ALLOWED_HOSTS
        at = next(i for i, line in enumerate(printed) if line.lstrip().startswith("curl "))
        (curl,) = commands("\n".join(printed[at : at + 2]))
        out = shell(in_here(curl), tmp_path)
        assert '"upload": {"status": "uploaded", "http_status": 200' in out, out
        assert tool.stdout.readline().startswith("received s3://images/try/0.jpeg: ")
    finally:
        tool.terminate()
        tool.wait(30)


def test_save_prints_an_error_answer_instead_of_a_traceback(tmp_path):
    """The README's curls pipe into examples/save.py: an error answer (or none: no server there) is one line."""
    error = {"error": {"message": "Invalid value for 'size'.", "type": "invalid_request_error", "param": "size"}}
    for stdin, expected in [
        (json.dumps(error), 'error: Invalid value for \'size\'. {"type": "invalid_request_error", "param": "size"}\n'),
        ("", "not an Images API answer (is the server running there?): ''\n"),
    ]:
        save = ["python3", ROOT / "examples/save.py", "out.jpeg"]  # the system's python3, as the README has it
        done = subprocess.run(save, input=stdin, capture_output=True, text=True, cwd=tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", expected)
    assert list(tmp_path.iterdir()) == []
