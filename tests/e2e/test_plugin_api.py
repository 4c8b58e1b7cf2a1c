"""The plugin interface: a third-party plugin found through the entry-point group (the contract it sees: its fields,
its option, what it adds to data[i], the engine thread), and the built-ins together."""

import io
import textwrap

import boto3
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from plugins.nsfw.demo import write_demo_classifier
from tests.support.images import decode_b64, pixels
from tests.support.loras import peft_lora
from tests.support.s3 import KEY_ID, REGION, SECRET, presigned_put

FAST = {"num_inference_steps": 4, "seed": 5}


@pytest.fixture
def third_party(tmp_path):
    """A separately installed package: a module plus a dist-info that registers it in the entry-point group."""
    site = tmp_path / "site"
    (site / "invert_plugin.py").parent.mkdir(parents=True)
    (site / "invert_plugin.py").write_text(
        textwrap.dedent("""
        import threading

        from fastapi import APIRouter
        from PIL import ImageOps
        from pydantic import BaseModel
        from server.plugins import Plugin, Processed

        class InvertFields(BaseModel):  # the request's field
            invert: bool = False

        class Inverted(BaseModel):  # what it adds to each data[i]
            inverted: bool

        class InvertPlugin(Plugin[bool]):
            name = "invert"
            fields = InvertFields

            def load(self, engine):
                self.engine = engine

            def option(self, request):
                return request.invert

            def postprocess(self, images, option):
                return [
                    Processed(ImageOps.invert(i) if option and i is not None else i, Inverted(inverted=option))
                    for i in images
                ]

            def router(self):
                router = APIRouter()

                @router.get("/v1/invert/engine-thread")
                async def engine_thread():
                    return {"thread": await self.engine.call(lambda: threading.current_thread().name)}

                return router
    """)
    )
    dist = site / "invert_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: invert-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[image_server.plugins]\ninvert = invert_plugin:InvertPlugin\n")
    return site


def test_third_party_plugin_from_its_own_package(make_server, third_party):
    srv = make_server({"PLUGINS": "invert", "PYTHONPATH": str(third_party)})
    client = srv.client(max_retries=0)

    def generate(invert):
        result = client.images.generate(
            prompt="x", size="256x256", output_format="png", extra_body={**FAST, "invert": invert}
        )
        return result.data[0]

    plain, inverted = generate(False), generate(True)
    assert inverted.model_extra["inverted"] is True and plain.model_extra["inverted"] is False
    assert (pixels(decode_b64(plain.b64_json)) + pixels(decode_b64(inverted.b64_json)) == 255).all()
    assert srv.client().models.list().data[0].model_extra["plugins"] == ["invert"]
    # the contract's way onto the engine thread (server/hooks.py, EngineView.call)
    assert httpx.get(f"{srv.url}/v1/invert/engine-thread").json()["thread"].startswith("engine")


def test_unknown_plugin_name_stops_startup(make_server):
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "lora,nonesuch"})
    srv.start(wait=False)
    assert srv.proc.wait(60) == 1
    assert "nonesuch" in srv.logs()


def test_all_builtins_in_one_request(make_server, moto, tmp_path):
    endpoint, _ = moto
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    peft_lora(lora_dir / "style.safetensors", seed=1)
    srv = make_server(
        {
            "PLUGINS": "lora,nsfw,upscale,upload",
            "LORA_DIR": str(lora_dir),
            "NSFW_MODEL_PATH": str(write_demo_classifier(tmp_path / "nsfw")),
            "NSFW_THRESHOLD": "1",
            "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*",
        }
    )
    urls = [presigned_put(endpoint, f"all/{i}.webp", content_type="image/webp") for i in range(2)]
    result = srv.client(max_retries=0).images.generate(
        prompt="x",
        size="128x128",
        n=2,
        output_format="webp",
        extra_body={
            **FAST,
            "loras": [{"name": "style", "weight": 0.8}],
            "nsfw_check": True,
            "upscale": 2,
            "upload_urls": urls,
        },
    )
    assert result.size == "256x256"
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    stored = []
    for i, item in enumerate(result.data):
        extra = item.model_extra
        assert extra["nsfw"] is False and extra["upload"]["status"] == "uploaded" and extra["seed"] == 5 + i
        body = s3.get_object(Bucket="images", Key=f"all/{i}.webp")["Body"].read()
        image = Image.open(io.BytesIO(body))
        assert (image.format, image.size) == ("WEBP", (256, 256))
        stored.append(np.asarray(image))
    assert (stored[0] != stored[1]).any()


def test_block_never_uploads_a_withheld_image(make_server, moto, tmp_path):
    endpoint, s3 = moto
    srv = make_server(
        {
            "PLUGINS": "nsfw,upload",
            "NSFW_MODEL_PATH": str(write_demo_classifier(tmp_path / "nsfw")),
            "NSFW_THRESHOLD": "0",
            "NSFW_ACTION": "block",
            "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*",
        }
    )
    with pytest.raises(openai.BadRequestError) as err:
        srv.client(max_retries=0).images.generate(
            prompt="x", size="128x128", extra_body={**FAST, "upload_urls": [presigned_put(endpoint, "blocked.jpeg")]}
        )
    assert err.value.body["code"] == "moderation_blocked"
    assert "Contents" not in s3.list_objects_v2(Bucket="images", Prefix="blocked")
