"""server/cli.py and server/serve.py: the command line as a user meets it, run as a child process. Each of these
answers before anything loads: help, a bad setting, a port in use."""

import re
import socket
import subprocess
import sys
from pathlib import Path

from server import config

IMAGE_SERVER = Path(sys.executable).parent / "image-server"


def cli(*args: str, env: dict[str, str] | None = None, program: tuple[str, ...] = (str(IMAGE_SERVER),)):
    """`image-server ARGS`, wide enough that argparse wraps no line."""
    full_env = {"COLUMNS": "400", "PATH": "", **(env or {})}
    return subprocess.run([*program, *args], capture_output=True, text=True, env=full_env, timeout=120)


def flag_help(out: str, flag: str) -> str:
    """The help paragraph of one flag, on one line."""
    paragraphs = re.split(r"\n  (?=-)", out)
    return " ".join(next(p for p in paragraphs if re.match(f"{flag}[ ,]", p)).split())  # ",": --x, --no-x


def test_help_prints_no_warning_and_documents_every_flag_with_its_variable():
    done = cli("serve", "--help")
    assert done.returncode == 0
    assert done.stderr == ""  # torchao's "Failed to load ..." lines included: nothing is imported that warns
    for section in (config.Settings, *config.plugin_sections().values()):
        for f in config.options(section):
            assert f"env {config.env_name(f)};" in flag_help(done.stdout, config.flag_name(f)), f.name
    assert "default ." not in done.stdout  # empty paths say "none", as the README does


def test_help_lists_the_values_of_every_setting_with_choices():
    out = cli("serve", "--help").stdout
    sections = (config.Settings, *config.plugin_sections().values())
    with_choices = [f for section in sections for f in config.options(section) if f.metadata["choices"]]
    assert {"engine", "nsfw_action", "dtype", "log_level"} <= {f.name for f in with_choices}
    for f in with_choices:
        assert "one of " + ", ".join(f.metadata["choices"]) in flag_help(out, config.flag_name(f)), f.name
    assert "[an integer >= 1;" in flag_help(out, "--max-batch")  # and the range of a number


def test_help_imports_neither_torch_nor_any_plugin():
    """What keeps `--help` fast (under a second here, where loading torch and the plugins took 6-7 s)."""
    script = (
        "import sys\nfrom server.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'fastapi', 'pydantic')"
        " or m.startswith('plugins.') and m != 'plugins.settings'), file=sys.stderr)"
    )
    done = cli(program=(sys.executable, "-c", script))
    assert done.returncode == 0 and done.stderr == "[]\n", done.stderr


def test_a_bad_setting_exits_2_with_the_problem_and_no_traceback():
    done = cli("serve", "--max-batch", "abc", env={"NSFW_ACTION": "Block"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "image-server: --max-batch='abc': expected an integer >= 1" in done.stderr
    assert "image-server: NSFW_ACTION='Block': expected one of flag, blur, block" in done.stderr


def test_a_port_in_use_is_one_line_and_exit_1_before_anything_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", "--port", str(port), env={"MODEL_PATH": "/nonexistent"})  # loading it would fail
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"image-server: cannot listen on 127.0.0.1:{port}: address already in use (is another server running "
        "there? Stop it, or choose another with --port or PORT)"
    ]


def test_an_address_that_is_not_here_is_one_line_too():
    done = cli("serve", "--host", "192.0.2.1", env={"MODEL_PATH": "/nonexistent"})  # TEST-NET-1: not local
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "image-server: cannot listen on 192.0.2.1:8000: cannot assign requested address"
    ]
