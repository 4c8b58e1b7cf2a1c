"""server/budget.py and server/spool.py: the input budgets on their own, then through the app (in process, a fake
engine): a large body and its data URLs on disk, never in memory; an edit's pixels in memory."""

import asyncio
import base64
import io
import json
import os
import shutil
import threading
import time

import pytest
from PIL import Image

from server.budget import InputBudget
from server.errors import APIError
from server.metrics import Metrics
from server.spool import Spool
from tests.support.fakes import InProcess, folders
from tests.support.waiting import until

MIB = 2**20
MEMORY = "image_server_input_memory_bytes"
DISK = "image_server_input_disk_bytes"
JSON = {"content-type": "application/json"}
SIDE = 512  # of the edits' images
PIXELS = 3 * SIDE * SIDE  # what an edit's image holds once decoded
# the largest request holds 6 MiB of disk, 2 x (2 + 1): its body and what its parse writes, or its files and a
# fetch; and 0.75 MiB of memory, 3 bytes x 256 Ki pixels
SMALL = {"max_body_mb": 2, "max_image_mb": 1, "max_input_pixels": SIDE * SIDE}


def budget(total: int, share: float = 0.5, holding: str = "memory") -> InputBudget:
    metrics = Metrics()
    return InputBudget(total, share, metrics.input_disk if holding == "disk" else metrics.input_memory, holding)


def refused(take) -> str:
    with pytest.raises(APIError) as caught:
        take()
    assert caught.value.status == 429 and int(caught.value.headers["Retry-After"]) >= 1
    return caught.value.code


def test_a_tenant_past_its_share_is_refused_while_another_is_admitted_until_the_budget_is_full():
    memory = budget(100)
    a, b = memory.reservation("a"), memory.reservation("b")
    a.resize(60)  # one request takes what it needs, past the share, while its tenant holds nothing else
    assert refused(lambda: memory.reservation("a").resize(1)) == "tenant_input_memory_full"
    b.resize(30)
    assert refused(lambda: memory.reservation("c").resize(11)) == "input_memory_full"
    assert refused(lambda: b.take(20)) == "input_memory_full"
    assert (a.bytes, b.bytes, memory.held.total()) == (60, 30, 90)  # a refusal takes nothing
    a.take(10)  # a request grows its own reservation: only its tenant's other requests count against the share
    a.release()
    b.release()
    b.release()  # idempotent
    assert memory.held.total() == 0 and not memory.held


async def _chunks(count: int, size: int = 4096):
    for _ in range(count):
        yield b"x" * size


def test_a_spooled_write_reserves_each_chunk_before_it_is_kept_and_removal_gives_all_back(tmp_path):
    spool = Spool(str(tmp_path / "spool"), budget(100_000, 1.0, "disk"))
    spool.start()
    one = spool.request("a")
    with pytest.raises(APIError) as full:
        asyncio.run(one.write(_chunks(30), "body"))
    assert full.value.code == "input_disk_full"
    assert one.disk.bytes == 24 * 4096  # what came before the refusal; nothing of the refused chunk
    one.remove()
    two = spool.request("a")
    with pytest.raises(ValueError):
        asyncio.run(two.write(_chunks(3), "body", (10_000, lambda: ValueError("too large"))))
    assert two.disk.bytes == 8192  # refused past its limit before the third chunk was reserved
    two.remove()
    assert spool.budget.held.total() == 0 and not folders(spool.root)
    kept = spool.request("b")
    path = asyncio.run(kept.write(_chunks(3), "fetched"))
    assert path.read_bytes() == b"x" * 3 * 4096 and kept.disk.bytes == 3 * 4096
    kept.drop(path)
    assert kept.disk.bytes == 0 and not path.exists()


def test_servers_sharing_spool_dir_each_have_their_own_folder_and_clear_only_the_gone_ones(tmp_path):
    """Servers on one host may share SPOOL_DIR: each makes its own folder, locked while it lives; a server starting
    removes the folders of servers that are gone (a crash), never a live one's, nor anything else there."""
    parent = tmp_path / "spool"
    crashed = parent / "image-server-spool-crashed"
    (crashed / "7").mkdir(parents=True)
    (crashed / ".lock").touch()  # its server is gone: nobody holds the lock
    (parent / "operator-file").write_bytes(b"x")
    one, two = Spool(str(parent), budget(100, 1.0, "disk")), Spool(str(parent), budget(100, 1.0, "disk"))
    one.start()
    assert not crashed.exists() and one.root.parent == parent
    (one.request("a").path("body")).write_bytes(b"held")
    two.start()  # one is alive: its folder stays
    assert one.root != two.root and list(one.root.glob("*/body.*")) and (parent / "operator-file").exists()
    one.close()
    two.close()
    assert sorted(p.name for p in parent.iterdir()) == ["operator-file"]


def test_a_spool_folder_removed_under_the_server_is_made_again(tmp_path):
    spool = Spool(str(tmp_path), budget(100, 1.0, "disk"))
    spool.start()
    shutil.rmtree(spool.root)  # a temporary-folder cleaner
    path = spool.request("a").path("body")
    path.write_bytes(b"x")
    assert path.parent.parent == spool.root
    spool.close()


def noise_edit(side: int = SIDE) -> tuple[bytes, int]:
    """A JSON edit of about 1 MiB, a PNG of noise as a data URL; and the PNG's size."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    body = json.dumps({"prompt": "p", "size": "64x64", "images": [{"image_url": url}]}).encode()
    return body, len(out.getvalue())


def edit(app: InProcess, body, headers: dict | None = None):
    return app.http.post("/v1/images/edits", content=body, headers={**JSON, **(headers or {})})


def _post(app: InProcess, answers: list, body: bytes, headers: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.append(edit(app, body, headers)))
    thread.start()
    return thread


def test_a_large_edit_holds_its_image_on_disk_and_its_pixels_in_memory_and_a_tenant_past_its_share_gets_429():
    """Waiting in the queue, a large JSON edit holds its decoded data URL's file (its body dropped once parsed)
    and its pixels; the same key's next body does not fit its share of the disk (429 before its body is read),
    another key's does."""
    keys = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
    body, png = noise_edit()
    settings = {"input_disk_mb": 6, "tenant_queue_share": 0.2, **SMALL}  # a key's share of the disk: 1.2 MiB
    with InProcess(api_key="key-a,key-b", max_batch=1, **settings) as app:
        app.engine.gate.clear()
        answers: list = []
        threads = [_post(app, answers, body, keys[0])]
        until(lambda: (app.metric(DISK), app.metric(MEMORY)) == (png, PIXELS), timeout=10)
        (held,) = app.service.spool.root.glob("*/data-url.*")
        assert held.stat().st_size == png  # the one file the request keeps
        own = edit(app, body, keys[0])
        threads.append(_post(app, answers, body, keys[1]))
        until(lambda: (app.metric(DISK), app.metric(MEMORY)) == (2 * png, 2 * PIXELS), timeout=10)
        app.engine.gate.set()
        for thread in threads:
            thread.join(10)
        until(lambda: app.metric(DISK) == app.metric(MEMORY) == 0, timeout=10)
        assert not folders(app.service.spool.root)
    assert own.status_code == 429 and own.json()["error"]["code"] == "tenant_input_disk_full"
    assert [a.status_code for a in answers] == [200, 200]


def test_every_ending_removes_the_request_s_files_and_gives_back_its_budgets():
    body, png = noise_edit()
    with InProcess(request_timeout=6, max_batch=1, **SMALL) as app:
        app.engine.gate.clear()
        waiting = threading.Thread(target=lambda: edit(app, body))
        waiting.start()
        until(lambda: (app.metric(DISK), app.metric(MEMORY)) == (png, PIXELS), timeout=10)
        waiting.join(10)  # past REQUEST_TIMEOUT its owner cancels it: 504, and what it held is released
        assert app.metric(DISK) == app.metric(MEMORY) == 0
        app.engine.gate.set()
        bad = edit(app, b"[" * MIB)
        assert bad.status_code == 400 and app.metric(DISK) == 0
        assert not folders(app.service.spool.root)


def test_the_budgets_hold_at_least_the_largest_request():
    from server.config import ConfigError, from_env

    # four edits of 2048x2048 pixels (MAX_PIXELS, what inputs are decoded to at most) and masks; a 64 MiB body and
    # two images
    pixels, disk = 4 * 4 * 2048 * 2048, 2 * (64 + 50) * MIB
    assert (from_env().input_memory_bytes, from_env().input_disk_bytes) == (pixels, disk)
    several = from_env(api_key="a,b")  # room for it in each tenant's share (0.5)
    assert (several.input_memory_bytes, several.input_disk_bytes) == (2 * pixels, 2 * disk)
    with pytest.raises(ConfigError, match=r"INPUT_MEMORY_MB=10 is below what the largest edit holds, 16 "):
        from_env(input_memory_mb=10)
    with pytest.raises(ConfigError, match=r"INPUT_DISK_MB=200 is below what the largest request holds, 228"):
        from_env(input_disk_mb=200)


def test_a_body_promised_and_not_sent_holds_nothing():
    """Its Content-Length is checked against what is free, but only the bytes that come are reserved."""
    disk = budget(100, holding="disk")
    promised = disk.reservation("a")
    promised.check(90)  # fits: nothing taken
    assert disk.held.total() == 0
    disk.reservation("b").resize(50)
    assert refused(lambda: promised.check(60)) == "input_disk_full"
    assert promised.bytes == 0 and disk.held.total() == 50


def test_an_edit_s_pixels_are_reserved_at_the_size_they_are_decoded_to():
    """An input larger than MAX_PIXELS is decoded to it (server/images.py, `fitted`): the engine gets that, and
    that is what the request holds of the input memory."""
    out = io.BytesIO()
    Image.new("RGB", (1024, 512), (200, 30, 90)).save(out, "PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    body = json.dumps({"prompt": "p", "size": "64x64", "images": [{"image_url": url}]}).encode()
    with InProcess(max_pixels=65536, default_size="256x256", max_batch=1) as app:
        app.engine.gate.clear()
        waiting = threading.Thread(target=lambda: edit(app, body))
        waiting.start()
        until(lambda: app.metric(MEMORY) == 3 * 362 * 181, timeout=10)  # 1024x512 scaled by sqrt(65536 / 524288)
        app.engine.gate.set()
        waiting.join(10)
        until(lambda: app.metric(MEMORY) == 0, timeout=10)
    assert app.engine.calls[-1].specs[0].image.size == (362, 181)


def test_a_url_from_a_host_not_allowed_is_a_400_even_when_the_spool_is_full(tmp_path):
    """The host is checked before the fetch reserves its disk: a URL that can never work is never a retryable 429."""
    from server.images import fetch_remote

    spool = Spool(str(tmp_path), budget(1, 1.0, "disk"))
    spool.start()
    one = spool.request("a")
    deadline = time.monotonic() + 10
    with pytest.raises(APIError) as err:
        asyncio.run(fetch_remote("http://10.0.0.1/x.png", "image", (), MIB, deadline, one))
    assert err.value.status == 400 and err.value.code == "remote_image_not_allowed"
    with pytest.raises(APIError) as full:
        asyncio.run(fetch_remote("http://127.0.0.1:9/x.png", "image", ("127.0.0.1:*",), MIB, deadline, one))
    assert full.value.code == "input_disk_full"
    spool.close()
