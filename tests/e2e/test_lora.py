"""The LoRA plugin through the real server: weighted sets, exact restore, names, defaults, management API."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.support.images import assert_openai_shape, decode_b64, gradient, pixels, png_bytes
from tests.support.loras import foreign_lora, kohya_lora, peft_lora, wrong_shape_lora

FAST = {"num_inference_steps": 4, "seed": 9}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    peft_lora(d / "style.safetensors", seed=1)
    kohya_lora(d / "detail.safetensors", seed=2)
    peft_lora(d / "grain.safetensors", seed=3, prefix="")  # bare keys: diffusers alone would load nothing
    peft_lora(d / "grain-prefixed.safetensors", seed=3)
    foreign_lora(d / "foreign.safetensors")
    return d


@pytest.fixture(scope="module")
def lora_server(lora_dir):
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "MAX_BATCH": "4"}).start()
    yield srv
    srv.stop()


def image(client, loras=None, **extra):
    body = {**FAST, **extra}
    if loras is not None:
        body["loras"] = loras
    result = client.images.generate(prompt="a fox", size="256x256", output_format="png", extra_body=body)
    return pixels(decode_b64(result.data[0].b64_json))


def test_weighted_loras_change_the_image_and_the_base_comes_back_exactly(lora_server):
    client = lora_server.client(max_retries=0)
    base = image(client)
    three = image(
        client, [{"name": "style", "weight": 1.0}, {"name": "detail", "weight": 0.7}, {"name": "grain", "weight": 0.5}]
    )
    assert np.abs(three - base).mean() > 1
    assert (image(client, []) == base).all()  # the empty set restores the base weights bit for bit
    one = image(client, [{"name": "style", "weight": 1.0}])
    assert (one != three).any() and (one != base).any()
    assert (image(client, [{"name": "style", "weight": 0}]) == base).all()  # weight 0 is the base image
    assert (image(client, [{"name": "style", "weight": 1.0}]) == one).all()  # a cached LoRA re-applies identically
    half = image(client, [{"name": "style", "weight": 0.5}])
    assert 0 < np.abs(half - base).mean() < np.abs(one - base).mean() * 1.5


def test_key_formats_load(lora_server):
    client = lora_server.client(max_retries=0)
    base = image(client, [])
    assert (image(client, [{"name": "detail"}]) != base).any()  # kohya keys
    bare = image(client, [{"name": "grain"}])
    assert (bare != base).any()
    assert (bare == image(client, [{"name": "grain-prefixed"}])).all()


@pytest.mark.parametrize(
    ("loras", "param", "code"),
    [
        ([{"name": "missing"}], "loras[0].name", "lora_not_found"),
        ([{"name": "../style"}], "loras[0].name", None),
        ([{"name": "/etc/passwd"}], "loras[0].name", None),
        ([{"name": "sub/style"}], "loras[0].name", None),
        ([{"name": "style"}, {"name": "style"}], "loras[1].name", None),
        ([{"name": "style"}, {"name": "detail"}, {"name": "grain"}, {"name": "grain-prefixed"}], "loras", None),
        ([{"name": "style", "weight": "heavy"}], "loras[0].weight", None),
        ("style", "loras", None),
    ],
)
def test_bad_lora_requests_are_400s(lora_server, loras, param, code):
    with pytest.raises(openai.BadRequestError) as err:
        lora_server.client(max_retries=0).images.generate(prompt="x", size="256x256", extra_body={"loras": loras})
    error = assert_openai_shape(err.value.response.json())
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_a_lora_that_loads_zero_keys_is_an_error_not_a_no_op(lora_server):
    client = lora_server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="256x256", extra_body={"loras": [{"name": "foreign"}], **FAST})
    assert err.value.body["code"] == "lora_invalid"
    assert "matches no layer" in err.value.body["message"]
    assert image(client, []) is not None  # the server goes on


def test_loras_on_edits_through_multipart(lora_server):
    client = lora_server.client(max_retries=0)

    def edit(loras):
        result = client.images.edit(
            image=("in.png", png_bytes(gradient(256, 256)), "image/png"),
            prompt="p",
            output_format="png",
            extra_body={**FAST, "loras": loras},
        )
        return pixels(decode_b64(result.data[0].b64_json))

    assert (edit([{"name": "style", "weight": 1.0}, {"name": "grain", "weight": 0.5}]) != edit([])).any()


def test_disabled_plugin_field_is_a_400_naming_it(server):
    with pytest.raises(openai.BadRequestError) as err:
        server.client(max_retries=0).images.generate(prompt="x", size="256x256", extra_body={"loras": []})
    assert err.value.body["param"] == "loras"
    assert err.value.body["code"] == "plugin_disabled"


def test_default_set_from_config(make_server, lora_dir):
    srv = make_server({"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "LORA_DEFAULTS": "style:1.0,detail:0.7,grain:0.5"})
    client = srv.client(max_retries=0)
    default = image(client)
    explicit = image(
        client, [{"name": "grain", "weight": 0.5}, {"name": "style", "weight": 1.0}, {"name": "detail", "weight": 0.7}]
    )
    assert (default == explicit).all()
    assert (image(client, []) != default).any()
    listed = {item["id"]: item["default_weight"] for item in httpx.get(srv.url + "/v1/loras").json()["data"]}
    assert listed["style"] == 1.0 and listed["detail"] == 0.7 and listed["foreign"] is None


def test_bad_default_set_stops_startup(make_server, lora_dir):
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "LORA_DEFAULTS": "style,nope:0.5"})
    srv.start(wait=False)
    assert srv.proc.wait(60) == 1
    assert "nope" in srv.logs()


def test_management_api(make_server, tmp_path):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    srv = make_server({"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "API_KEY": "user", "ADMIN_API_KEY": "admin"})
    url = srv.url + "/v1/loras"
    admin, user = {"Authorization": "Bearer admin"}, {"Authorization": "Bearer user"}
    good = peft_lora(tmp_path / "new-style.safetensors", seed=5)

    def upload(path, headers, name=None):
        data = {"name": name} if name else {}
        return httpx.post(url, files={"file": (path.name, path.read_bytes())}, data=data, headers=headers, timeout=60)

    assert httpx.get(url, headers=user).json()["data"] == []
    assert httpx.get(url).status_code == 401
    assert upload(good, user).status_code == 403
    assert upload(good, {}).status_code == 401
    response = upload(good, admin)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "new-style"
    assert upload(good, admin).status_code == 409
    for bad in (foreign_lora(tmp_path / "foreign.safetensors"), wrong_shape_lora(tmp_path / "shape.safetensors")):
        response = upload(bad, admin)
        assert response.status_code == 400
        assert assert_openai_shape(response.json())["code"] == "lora_invalid"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert upload(garbage, admin).status_code == 400
    assert upload(good, admin, name="../evil").status_code == 400
    assert sorted(p.name for p in lora_dir.iterdir()) == ["new-style.safetensors"]  # nothing bad was kept

    client = srv.client(api_key="user", max_retries=0)
    assert client.images.generate(prompt="x", size="256x256", extra_body={**FAST, "loras": [{"name": "new-style"}]})
    assert httpx.delete(url + "/new-style", headers=user).status_code == 403
    assert httpx.delete(url + "/new-style", headers=admin).json()["deleted"] is True
    assert httpx.delete(url + "/new-style", headers=admin).status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", size="256x256", extra_body={"loras": [{"name": "new-style"}]})


def test_management_is_off_without_an_admin_key_when_keys_are_set(make_server, tmp_path):
    srv = make_server({"PLUGINS": "lora", "LORA_DIR": str(tmp_path), "API_KEY": "user"})
    path = peft_lora(tmp_path / "x.safetensors", seed=1)
    response = httpx.post(
        srv.url + "/v1/loras",
        files={"file": ("y.safetensors", path.read_bytes())},
        headers={"Authorization": "Bearer user"},
    )
    assert response.status_code == 403


def test_set_aware_scheduling_switches_less_than_arrival_order(make_server, lora_dir):
    """While a long request runs, alternating A/B requests pile up; with preference they run grouped by set."""

    def switches(max_bypass: str) -> float:
        srv = make_server({"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "MAX_BATCH": "1", "MAX_BYPASS": max_bypass})
        client = srv.client(max_retries=0)
        sets = [[{"name": "style"}], [{"name": "grain"}]]

        def run(i):
            return client.images.generate(prompt=f"{i}", size="256x256", extra_body={**FAST, "loras": sets[i % 2]})

        with ThreadPoolExecutor(9) as pool:
            first = pool.submit(
                client.images.generate,
                prompt="long",
                size="1024x1024",
                extra_body={"num_inference_steps": 28, "loras": sets[0]},
            )
            while srv.metric("image_server_in_flight") < 1:
                pass
            results = [pool.submit(run, i) for i in range(1, 9)]
            assert first.result() and all(r.result() for r in results)
        count = srv.metric("image_server_prep_switches_total")
        srv.stop()
        return count

    assert switches("4") < switches("0")
