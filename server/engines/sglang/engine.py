"""The SGLang engine: generation by an `sglang serve` child process, reached over its HTTP API.

SGLang runs unmodified in its own virtual environment (SGLANG_BIN), so its exact
pins (torch, transformers, diffusers) never meet ours. image-server keeps
everything around generation: auth, the bounded queue, plugins (NSFW, upscale,
upload, LoRA sets), metrics and the OpenAI response shape. Each request becomes
one SGLang call per run of consecutive seeds (SGLang seeds image i of a call
with seed + i), asking for lossless PNG so the server re-encodes once.

Only the engine thread calls generate() and the LoRA applier, so LoRA switches
(global state in SGLang) and generations never interleave.
"""

import base64
import io
import logging
import os
import shlex
import shutil
from pathlib import Path

import httpx
from PIL import Image

from server.config import Settings
from server.engines.base import Engine, Progress
from server.engines.diffusers import served_name
from server.engines.sglang.errors import MAX_ANSWER, error_text, read_bounded, refused
from server.engines.sglang.lora import LoRAChecker, SGLangLoRAApplier
from server.engines.sglang.models import EDIT_TASKS, IMAGE_TASKS, VIDEO_TASKS, version_tuple
from server.engines.sglang.process import Ports, SGLangProcess
from server.engines.sglang.video import SGLangVideos
from server.errors import APIError, bad_request, unavailable
from server.families import EMBEDDED, NONE, detect_family, true_cfg_weight
from server.hooks import EngineHooks
from server.spec import GenerationSpec

log = logging.getLogger("server.engines.sglang")

SGLANG_VERSION = "0.5.23"  # the version these adapters were written and tested against
_QUIET_ROUTES = ("/health", "/server_info", "/v1/models")  # polled by us; kept out of SGLang's access log


def sglang_executable(settings: Settings) -> str:
    """SGLANG_BIN, else the venv scripts/setup-sglang.sh makes under CACHE_DIR, else `sglang` on PATH."""
    if settings.sglang_bin:
        path = Path(settings.sglang_bin).expanduser()
        if not path.exists():
            raise SystemExit(
                f"SGLANG_BIN={settings.sglang_bin!r} does not exist: this installation has no SGLang (an image built "
                "with `./build.sh --lean` leaves it out; the default image has it, or run scripts/setup-sglang.sh)."
            )
        if not os.access(path, os.X_OK):
            raise SystemExit(f"SGLANG_BIN={settings.sglang_bin!r} is not an executable file.")
        return str(path)
    venv = settings.cache_dir / f"sglang-{SGLANG_VERSION}" / "bin" / "sglang"
    if os.access(venv, os.X_OK):
        return str(venv)
    on_path = shutil.which("sglang")
    if on_path:
        return on_path
    raise SystemExit(
        "ENGINE=sglang needs SGLang: run scripts/setup-sglang.sh (a separate virtual environment with "
        f"sglang[diffusion]=={SGLANG_VERSION}) and point SGLANG_BIN at its bin/sglang."
    )


def option_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in an argument list (`--flag V` or `--flag=V`); the last one wins, as in argparse."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
    return value


def seed_runs(seeds: list[int]) -> list[tuple[int, int]]:
    """[5, 6, 7, 2] -> [(5, 3), (2, 1)]: SGLang seeds image i of an n-image call with seed + i."""
    runs: list[tuple[int, int]] = []
    for seed in seeds:
        if runs and runs[-1][0] + runs[-1][1] == seed:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((seed, 1))
    return runs


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image.convert("RGB")


class SGLangEngine(Engine):
    can_batch = False  # one request per call: its own n and seeds; SGLang queues calls FIFO anyway

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.name = served_name(settings)
        self.info: dict = {"engine": "sglang"}
        self.folder: Path | None = None
        self.process: SGLangProcess | None = None
        self.version = ""
        self.tasks: set[str] = set()
        self.videos: SGLangVideos | None = None
        self.extra_args = shlex.split(settings.sglang_args)
        self._http = httpx.Client(
            trust_env=False,  # loopback: never through a proxy
            timeout=httpx.Timeout(settings.request_timeout, connect=5.0),
        )

    # -- lifecycle (engine thread) ---------------------------------------

    def load(self, hooks: EngineHooks) -> None:
        """SGLang builds its own pipeline and applies LoRAs itself: it asks the plugins nothing."""
        from server.engines.diffusers import model_folder

        self.folder = model_folder(self.settings)
        self.family = detect_family(self.folder, self.settings.sglang_model_id)
        self._check_folder_name()
        executable = sglang_executable(self.settings)
        scratch = self.settings.cache_dir / "sglang-run"
        scratch.mkdir(parents=True, exist_ok=True)
        self.process = SGLangProcess(
            lambda ports: self._command(executable, ports),
            env=self._child_env(),
            cwd=str(scratch),
            start_timeout=self.settings.sglang_start_timeout,
            port=self.settings.sglang_port,
        )
        log.info("starting SGLang for %s (family %s) from %s", self.folder, self.family.name, executable)
        self.process.start()
        self.process.wait_ready()
        self._describe()
        self.lora_applier = SGLangLoRAApplier(self._post, self.process, LoRAChecker(self.folder), scratch)
        if self.family.video:
            self.videos = SGLangVideos(self._request, self._raise_for, Path(self._output_path()))

    def close(self) -> None:
        """Stops the child (after the service has drained)."""
        if self.process is not None:
            self.process.stop()
        super().close()

    @property
    def healthy(self) -> bool:
        return self.process is not None and self.process.healthy and super().healthy

    @property
    def retry_after(self) -> int:
        return self.process.retry_after if self.process else 10

    def defaults(self) -> tuple[int, float]:
        return self.family.steps, self.default_guidance

    @property
    def default_guidance(self) -> float:
        """The family's, unless set: for guidance-distilled FLUX the value SGLang is started with."""
        configured = option_value(self.extra_args, "--embedded-cfg-scale")
        if configured is not None and self.family.guidance_mode == EMBEDDED:
            return float(configured)
        if self.settings.default_guidance >= 0:
            return self.settings.default_guidance
        return self.family.guidance

    def warmup(self) -> None:
        if not self.can_generate:
            log.info("no image warm-up: %s generates no images from text", self.family.name)
            return
        spec = GenerationSpec(
            prompt="warm up", n=1, width=256, height=256, steps=2, guidance=self.default_guidance, seeds=[0]
        )
        self.generate([spec], Progress())

    # -- what the family and the running server can do -------------------

    @property
    def can_generate(self) -> bool:
        return self.family.text2img and self.family.video is None and bool(self.tasks & IMAGE_TASKS)

    @property
    def can_edit(self) -> bool:
        new_enough = version_tuple(self.version) >= version_tuple(self.family.sglang_edits_since or "0")
        images = self.family.edits and self.family.video is None
        return images and new_enough and bool(self.tasks & EDIT_TASKS)

    @property
    def can_video(self) -> bool:
        return self.family.video is not None and bool(self.tasks & VIDEO_TASKS)

    # -- the child's command line ----------------------------------------

    def _check_folder_name(self) -> None:
        needed = self.family.needs_name
        if needed and needed not in str(self.folder).lower():
            raise SystemExit(
                f"SGLang recognises {self.family.name} only by a model path containing {needed!r}; "
                f"rename or link {self.folder} (e.g. .../{needed})."
            )

    def _output_path(self) -> str:
        """Images come back as b64_json and are never saved; videos must be saved for SGLang to serve them."""
        if self.family.video is None:
            return ""
        path = self.settings.cache_dir / "sglang-videos"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _command(self, executable: str, ports: Ports) -> list[str]:
        family = self.family
        args = [
            executable, "serve", "--model-type", "diffusion", "--model-path", str(self.folder),
            "--served-model-name", self.name,
            "--host", "127.0.0.1", "--port", str(ports.http),
            "--scheduler-port", str(ports.scheduler), "--master-port", str(ports.master),
            "--strict-ports",  # never a silently moved port
            "--sleep-on-idle",  # else its idle worker busy-polls a core
            "--output-path", self._output_path(), "--input-save-path", "",
            "--uvicorn-access-log-exclude-prefixes", *_QUIET_ROUTES,
        ]  # fmt: skip
        if family.sglang_model_id:
            # a local folder is matched to a native pipeline by its name; without --backend sglang a
            # miss falls back silently to SGLang's diffusers backend, which has no LoRA
            args += ["--backend", "sglang", "--model-id", family.sglang_model_id]
        if family.guidance_mode == EMBEDDED:
            args += ["--embedded-cfg-scale", f"{self.default_guidance:g}"]
        return args + self.extra_args  # last, so that SGLANG_ARGS overrides any of ours

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not self.settings.allow_download:
            env["HF_HUB_OFFLINE"] = "1"
        return env

    def _describe(self) -> None:
        """Version and task types from the running server, for /v1/models and the startup log."""
        self.version = self._get("/server_info").get("version", "")
        cards = self._get("/v1/models").get("data") or [{}]
        card = cards[0]
        self.tasks = set(card.get("supported_task_types") or [card.get("task_type", "")])
        if self.version != SGLANG_VERSION:
            log.warning("SGLang %s is not the tested version %s", self.version, SGLANG_VERSION)
        self.info = {
            "engine": "sglang",
            "sglang_version": self.version,
            "family": self.family.name,
            "sglang_model_id": self.family.sglang_model_id or None,
            "pipeline": card.get("pipeline_class"),
            "task_types": sorted(self.tasks),
            "generations": self.can_generate,
            "edits": self.can_edit,
            "videos": self.can_video,
            "family_verified": self.family.sglang_verified,
        }
        log.info("SGLang %s serving %s: %s", self.version, self.name, self.info)

    # -- HTTP to the child (engine thread) -------------------------------

    def _unavailable(self, why: str) -> APIError:
        return unavailable(
            f"The generation engine is restarting ({why}); retry shortly.", "engine_restarting", self.retry_after
        )

    def _post(self, path: str, limit: int = MAX_ANSWER, **kwargs) -> httpx.Response:
        return self._request("POST", path, limit, **kwargs)

    def _request(self, method: str, path: str, limit: int = MAX_ANSWER, **kwargs) -> httpx.Response:
        """A call to the child, its answer read up to `limit` bytes; a dead or unreachable child is a 503 with
        Retry-After, never a hang."""
        if not self.healthy:
            raise self._unavailable("SGLang is not running")
        try:
            with self._http.stream(method, self.process.base_url + path, **kwargs) as response:
                return read_bounded(response, limit)
        except httpx.TimeoutException:
            raise APIError(
                504,
                f"SGLang did not answer within {self.settings.request_timeout:g} seconds.",
                type="timeout_error",
                code="timeout",
            ) from None
        except httpx.TransportError as exc:
            log.warning("lost the connection to SGLang: %r", exc)
            raise self._unavailable("lost the connection to SGLang") from None

    def _get(self, path: str) -> dict:
        with self._http.stream("GET", self.process.base_url + path, timeout=10) as streamed:
            response = read_bounded(streamed)
        response.raise_for_status()
        return response.json()

    # -- generation (engine thread) --------------------------------------

    def generate(self, specs: list[GenerationSpec], progress: Progress) -> list[list[Image.Image]]:
        if specs[0].frames:
            guidance = self.family.guidance_mode not in (EMBEDDED, NONE)
            return [self.videos.make(spec, self.family.video.fps, guidance, progress) for spec in specs]
        return [self._images(spec, progress) for spec in specs]

    def _images(self, spec: GenerationSpec, progress: Progress) -> list[Image.Image]:
        images: list[Image.Image] = []
        for seed, count in seed_runs(spec.seeds):
            if images and progress.should_stop():
                break  # every waiter has gone: SGLang cannot cancel a call, but we can skip the next
            images += self._call(spec, seed, count)
        return images

    def check(self, spec: GenerationSpec) -> None:
        """What SGLang cannot do for this family is a 400 before the request queues."""
        family = self.family.name
        if spec.frames and not self.can_video:  # the family's video rules are /v1/videos' to check
            raise bad_request(f"This model ({family}) makes no video in SGLang.", "model", "unsupported")
        if not spec.frames:
            self._check_image_mode(spec)
        if spec.strength is not None:
            raise bad_request("'strength' is not supported by the SGLang engine.", "strength", "unsupported")
        if spec.negative_prompt is not None and not self.family.negative_prompt:
            raise bad_request(f"This model ({family}) takes no negative prompt.", "negative_prompt", "unsupported")
        if self.family.guidance_mode == EMBEDDED and spec.guidance != self.default_guidance:
            raise bad_request(
                f"This model's guidance is fixed at {self.default_guidance:g} when SGLang starts "
                "(DEFAULT_GUIDANCE, or --embedded-cfg-scale in SGLANG_ARGS); omit 'guidance_scale' or send that value.",
                "guidance_scale",
                "unsupported",
            )

    def _check_image_mode(self, spec: GenerationSpec) -> None:
        family = self.family.name
        if spec.mode == "inpaint":
            raise bad_request("Masks (inpainting) are not supported by the SGLang engine.", "mask", "unsupported")
        if spec.mode == "img2img" and not self.can_edit:
            raise bad_request(f"This model ({family}) has no edit endpoint in SGLang.", "image", "unsupported")
        if spec.mode == "text2img" and not self.can_generate:
            where = "/v1/videos" if self.can_video else "/v1/images/edits with an input image"
            raise bad_request(
                f"This model ({family}) does not generate images from text; use {where}.", None, "unsupported"
            )

    def _fields(self, spec: GenerationSpec, seed: int, count: int) -> dict:
        fields = {
            "prompt": spec.prompt,
            "n": count,
            "size": f"{spec.width}x{spec.height}",
            "seed": seed,
            "num_inference_steps": spec.steps,
            "response_format": "b64_json",
            "output_format": "png",  # lossless: the server encodes the final format once
        }
        if self.family.guidance_mode not in (EMBEDDED, NONE):
            fields["guidance_scale"] = spec.guidance
        if spec.negative_prompt is not None:
            fields["negative_prompt"] = spec.negative_prompt
        # explicit with a negative prompt, so that CFG runs at the weight the request meant, not SGLang's default
        true_cfg = true_cfg_weight(spec.true_cfg, spec.negative_prompt)
        if true_cfg is not None:
            fields["true_cfg_scale"] = true_cfg
        return fields

    def _call(self, spec: GenerationSpec, seed: int, count: int) -> list[Image.Image]:
        fields = self._fields(spec, seed, count)
        # base64 of lossless RGB PNGs, with room; at the largest size a request may ask, not this one's: an edit
        # model may answer at its own resolution (FLUX.1 Kontext does), which the engine then checks
        pixels = max(spec.width * spec.height, self.settings.max_pixels)
        limit = MAX_ANSWER + count * 5 * pixels
        if spec.mode == "text2img":
            response = self._post("/v1/images/generations", limit, json=fields)
        else:
            files = {"image": ("image.png", _png(spec.image), "image/png")}
            data = {k: str(v) for k, v in fields.items()}
            response = self._post("/v1/images/edits", limit, data=data, files=files)
        self._raise_for(response)
        data = response.json().get("data") or []
        if len(data) != count:
            raise APIError(500, f"SGLang returned {len(data)} images for n={count}.", code="engine_error")
        return [_decode(item["b64_json"]) for item in data]

    def _raise_for(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        if status in (400, 422):
            raise bad_request(refused("the request", response), None, "invalid_value")
        if status == 503:
            log.warning("SGLang answered 503: %s", error_text(response))
            raise self._unavailable("SGLang is unavailable")
        log.error("SGLang answered %d: %s", status, error_text(response))
        raise APIError(
            500,
            f"SGLang failed to generate the image (HTTP {status}; the server log has its reason).",
            code="engine_error",
        )
