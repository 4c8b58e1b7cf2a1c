"""The image, built and run for real. build.sh builds the CPU variant (Debian 12, Python 3.11, CPU torch: the CUDA
image differs only in its build arguments) from the wheelhouse that download-packages.sh fills, --save writes it out
and `docker load` brings it back; then the container runs as OpenShift's restricted-v2 runs the pod of k8s/ (its
security context and volumes are read from the rendered manifest), is driven with the official OpenAI SDK, and is
stopped with work queued.

Needs root, docker and mmdebstrap (scripts/setup.sh --test installs them). A docker daemon is started when none runs,
and only that one is stopped afterwards; a daemon that cannot start fails the test with its log.
IMAGE_SERVER_SKIP_CONTAINER=1 skips this module, leaving the image untested.
Kept between runs on one machine: the Debian base image (tagged by a hash of its mmdebstrap command), the wheelhouse
and Docker's build cache. On 2 cores: 5.5 minutes with nothing cached (the base
image 1, the build 2, the save 1), 2 minutes warm (mostly build.sh --save's compression, the drain, the model load);
up to 7 and 3 beside another test run.
"""

import os
import re
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from bench.harness import free_port, scrape
from tests.support.deploy import ROOT, WHEELHOUSE, objects, run
from tests.support.docker import docker_daemon
from tests.support.images import decode_b64, gradient, png_bytes
from tests.support.waiting import submit_accepted, until

# A cold run (base image, wheelhouse, build) takes minutes; a warm one mostly saves, loads and serves.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# restricted-v2 runs a pod under a UID from its project's range (such as 1000770000-1000779999), in group 0.
OPENSHIFT_UID = 1000770000
FAST = {"num_inference_steps": 2, "seed": 3}


# -- docker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker():
    """The docker CLI, talking to a daemon: the running one, else a dockerd started here and stopped afterwards."""
    if os.environ.get("IMAGE_SERVER_SKIP_CONTAINER") == "1":
        pytest.skip("IMAGE_SERVER_SKIP_CONTAINER=1: the image is not built or run")
    yield from docker_daemon()


def inspect(docker: str, name: str, template: str) -> str:
    result = run([docker, "inspect", "--format", template, name])
    assert result.returncode == 0, result.stdout
    return result.stdout.strip()


# -- the image ------------------------------------------------------------------


@dataclass
class Built:
    tag: str  # image-server:<tag>, as build.sh named it
    archive: Path  # what build.sh --save wrote


@pytest.fixture(scope="module")
def image(docker):
    """The CPU image as a user builds it without a registry: Debian base, wheelhouse, then build.sh --cpu --save."""
    env = {**os.environ, "DOCKER": docker}
    env.pop("IMAGE_TAG", None)  # the tag is build.sh's own: short hash (-dirty) -cpu
    base = run([ROOT / "docker/debian-base.sh"], env=env)
    assert base.returncode == 0, base.stdout
    target = ["--cpu", "--dest", WHEELHOUSE]
    wheels = run([ROOT / "download-packages.sh", *target], env={**env, "PYTHON": sys.executable})
    assert wheels.returncode == 0, wheels.stdout
    # --network host: the build's apt-get then reaches Debian's mirror as this machine does, bridge or no bridge.
    args = ["--cpu", "--wheelhouse", WHEELHOUSE, "--save", "--build-arg", f"BASE_IMAGE={base.stdout.split()[-1]}"]
    build = run([ROOT / "build.sh", *args, "--network", "host"], env=env)
    assert build.returncode == 0, build.stdout[-10000:]
    tag = re.search(r"^build\.sh: building (image-server:\S+)", build.stdout, re.M)[1]
    archive = ROOT / build.stdout.strip().splitlines()[-1].removeprefix("docker load -i ")
    yield Built(tag, archive)
    archive.unlink(missing_ok=True)  # hundreds of MB in the checkout's out/


def test_saved_image_loads_back_as_the_same_image(docker, image):
    """What an offline cluster gets: the archive alone makes the same image (the tests below then run that one)."""
    image_id = inspect(docker, image.tag, "{{.Id}}")
    version = inspect(docker, image.tag, '{{index .Config.Labels "org.opencontainers.image.version"}}')
    assert version == image.tag.removeprefix("image-server:")  # so an equal build under another tag is another image
    removed = run([docker, "rmi", image.tag])
    assert removed.returncode == 0, removed.stdout
    assert run([docker, "image", "inspect", image_id]).returncode != 0, "another tag keeps the image: not a real load"
    loaded = run([docker, "load", "--input", image.archive])
    assert loaded.returncode == 0, loaded.stdout
    assert f"Loaded image: {image.tag}" in loaded.stdout
    assert inspect(docker, image.tag, "{{.Id}}") == image_id


def test_a_command_that_is_not_a_flag_runs_instead_of_the_server(docker, image):
    default = run([docker, "run", "--rm", image.tag, "bash", "-c", "id"])
    assert default.stdout.strip() == "uid=1001(image-server) gid=0(root) groups=0(root)", default.stdout
    arbitrary = run([docker, "run", "--rm", "--user", f"{OPENSHIFT_UID}:0", image.tag, "id", "-u"])
    assert arbitrary.stdout.strip() == str(OPENSHIFT_UID), arbitrary.stdout


# -- the container, as OpenShift runs it -----------------------------------------


def pod_run_flags(overlay: str) -> list[str]:
    """`docker run` flags for the Deployment's pod in `overlay`: its security context and emptyDir volumes, as the
    kubelet applies them. Any setting not translated here fails the test, so the manifests cannot drift away from
    what this test ran. The models volume is left out: the demo model builds into the state path."""
    pod = objects(overlay)["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert set(pod_security) <= {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"}, pod_security
    assert set(security) <= {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}, security
    assert set(security["capabilities"]) == {"drop"}, security
    user, group = pod_security.get("runAsUser", OPENSHIFT_UID), pod_security.get("runAsGroup", 0)
    assert pod_security["runAsNonRoot"] and user != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}  # Docker's default profile: no flag
    flags = ["--user", f"{user}:{group}"]
    if security["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    if not security["allowPrivilegeEscalation"]:
        flags += ["--security-opt", "no-new-privileges"]
    for capability in security["capabilities"]["drop"]:
        flags += ["--cap-drop", capability]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            continue
        empty_dir = volume["emptyDir"]
        size = docker_size(empty_dir["sizeLimit"])
        if empty_dir.get("medium") == "Memory":
            assert mount["mountPath"] == "/dev/shm", mount
            flags += ["--shm-size", size]
        else:  # an emptyDir starts empty, mode 0777, and allows exec (Triton and Inductor load what they compile)
            flags += ["--tmpfs", f"{mount['mountPath']}:rw,exec,mode=0777,size={size}"]
    return flags


def docker_size(quantity: str) -> str:
    """A Kubernetes quantity in binary units (20Gi) as docker writes it (20g)."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()
    return number + unit[0].lower()


@dataclass
class Container:
    name: str
    url: str
    api_key: str
    docker: str
    # (seconds after start, /health status, /ready status) from the start until ready; 0: no answer yet
    observed: list[tuple[float, int, int]] = field(default_factory=list)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0)

    def status(self, path: str) -> int:
        try:
            return httpx.get(self.url + path, timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def generate(self, body: dict) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.post(self.url + "/v1/images/generations", json=body, headers=headers, timeout=300)

    def inspect(self, template: str) -> str:
        return inspect(self.docker, self.name, template)

    def logs(self) -> str:
        return run([self.docker, "logs", self.name]).stdout

    def watch_until_ready(self, timeout: float = 180) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            health, ready = self.status("/health"), self.status("/ready")
            self.observed.append((round(time.monotonic() - start, 2), health, ready))
            if ready == 200:
                return
            if self.inspect("{{.State.Running}}") != "true":
                pytest.fail(f"the container stopped while loading:\n{self.logs()}")
            time.sleep(0.1)
        pytest.fail(f"not ready after {timeout:g}s:\n{self.logs()}")


@pytest.fixture(scope="module")
def served(docker, image):
    """The image under OpenShift's restricted-v2 settings, serving the demo model on a loopback port."""
    port = free_port()
    served = Container(f"image-server-test-{secrets.token_hex(4)}", f"http://127.0.0.1:{port}", "test-key", docker)
    started = run(
        [
            docker, "run", "--detach", "--name", served.name, *pod_run_flags("k8s/overlays/openshift"),
            "--publish", f"127.0.0.1:{port}:8000",
            "--env", "MODEL_PATH=demo", "--env", f"API_KEY={served.api_key}", "--env", "MAX_BATCH=1",
            # The image's own HEALTHCHECK, checked every 2 s instead of every 30 s.
            "--health-interval", "2s", "--health-start-period", "60s",
            image.tag,
        ]
    )  # fmt: skip
    assert started.returncode == 0, started.stdout
    try:
        served.watch_until_ready()
        yield served
    finally:
        run([docker, "rm", "--force", served.name])


def test_health_answers_while_the_model_loads(served):
    # The demo model is built into the empty state path at every start: seconds of /health 200 with /ready 503.
    assert any(health == 200 and ready == 503 for _, health, ready in served.observed), served.observed


def test_runs_as_the_arbitrary_uid_with_only_the_state_path_writable(served):
    probe = "id -u; touch /app/state/probe && echo state ok; touch /app/probe 2>&1 || true"
    result = run([served.docker, "exec", served.name, "bash", "-c", probe])
    assert result.stdout.splitlines() == [
        str(OPENSHIFT_UID),
        "state ok",
        "touch: cannot touch '/app/probe': Read-only file system",
    ], result.stdout
    assert served.inspect("{{.HostConfig.CapDrop}}") == "[ALL]"


def test_generate_and_edit_through_the_openai_sdk(served):
    client = served.client()
    result = client.images.generate(prompt="a lighthouse", size="256x256", n=2, extra_body=FAST)
    assert [decode_b64(d.b64_json).size for d in result.data] == [(256, 256)] * 2
    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (64, 64, 192, 192))  # repaint the middle
    edit = client.images.edit(
        image=("in.png", png_bytes(gradient(256, 256)), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a window",
        extra_body=FAST,
    )
    assert decode_b64(edit.data[0].b64_json).size == (256, 256)
    with pytest.raises(openai.AuthenticationError):  # API_KEY from the environment is enforced
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_the_images_healthcheck_turns_healthy(served):
    deadline = time.monotonic() + 60
    while served.inspect("{{.State.Health.Status}}") != "healthy":
        assert time.monotonic() < deadline, served.inspect("{{json .State.Health}}")
        time.sleep(0.5)
    # The check that ran is the image's own command; only its interval was shortened.
    assert "/health" in served.inspect("{{json .Config.Healthcheck.Test}}")


def test_docker_stop_drains_queued_work_then_exits_zero(served):
    """docker stop's SIGTERM reaches the server (the entrypoint execs it): queued work is answered, new work gets
    503, and the container exits 0. Last in this module: it stops the container."""
    slow = {"prompt": "queued", "size": "512x512", "num_inference_steps": 28}
    with ThreadPoolExecutor(6) as pool:
        accepted = submit_accepted(pool, served.url, served.generate, [{**slow, "seed": i} for i in range(4)])
        until(lambda: scrape(served.url, "image_server_queue_depth") >= 2, 60, "a queue")
        stopping = pool.submit(run, [served.docker, "stop", "--time", "120", served.name])
        until(lambda: served.status("/ready") == 503, 60, "readiness 503")
        late = served.generate(slow)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        assert served.status("/health") == 200
        assert [f.result().status_code for f in accepted] == [200] * 4
        assert stopping.result().returncode == 0
    assert served.inspect("{{.State.ExitCode}}") == "0", served.logs()
    assert "draining" in served.logs()
