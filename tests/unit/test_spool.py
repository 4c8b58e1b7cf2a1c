"""The input spool (server/spool.py) through the app: each found by a review, reproduced before its fix."""

import base64
import io
import json
import os
import shutil
import threading

import openai
import pytest
from PIL import Image

from server.bodies import IMAGE_URL_CHARS
from server.budget import InputBudget
from server.metrics import Metrics
from server.spool import LOCK, PREFIX, Spool
from tests.support.fakes import InProcess
from tests.support.images import png_bytes
from tests.support.waiting import until

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def test_a_remix_whose_source_is_deleted_while_its_reference_decodes_is_no_500_and_leaves_no_folder(tmp_path):
    """A remix's reference is copied into the request's spool before it is read: the source deleted (or expired)
    meanwhile is no 500, leaves no job's folder behind in VIDEO_DIR, and the remix is made from the copy."""
    videos = tmp_path / "videos"
    with InProcess(video_dir=videos) as app:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app.http)
        reference = png_bytes(Image.new("RGB", (64, 64), (200, 30, 90)))
        source = client.videos.create_and_poll(
            prompt="a", seconds="0.5", input_reference=("r.png", reference, "image/png"), poll_interval_ms=10
        )
        assert source.status == "completed"
        service = app.service
        decode = service.decode

        async def decode_then_delete(image, mask, deadline):
            decoded = await decode(image, mask, deadline)
            app.app.state.videos.store.delete(source.id)  # the owner deletes it meanwhile (or it expires)
            return decoded

        service.decode = decode_then_delete
        try:
            answer = app.http.post(f"/v1/videos/{source.id}/remix", json={"prompt": "b"})
        finally:
            service.decode = decode
        assert answer.status_code == 200, answer.text
        assert client.videos.poll(answer.json()["id"], poll_interval_ms=10).status == "completed"
        folders = list(videos.iterdir())
        assert len(folders) == 1 and (folders[0] / "job.json").exists()  # the remix's; the source's is gone


def test_two_servers_on_one_spool_dir_never_read_each_other_s_files(tmp_path):
    """multi-gpu/run.sh passes its whole environment to every instance, SPOOL_DIR included: each instance has its
    own folder there, so one never decodes the other's upload (their request folders and files are named alike)."""
    shared = str(tmp_path / "spool")
    red, blue = (200, 30, 90), (20, 40, 220)
    with InProcess(spool_dir=shared) as a, InProcess(spool_dir=shared) as b:
        b.engine.gate.clear()
        others: list = []
        decode = a.service.decode

        def b_edits() -> None:
            files = {"image": ("b.png", png_bytes(Image.new("RGB", (64, 64), blue)), "image/png")}
            others.append(b.http.post("/v1/images/edits", data={"prompt": "b", "size": "64x64"}, files=files))

        async def b_edits_meanwhile(image, mask, deadline):
            threading.Thread(target=b_edits).start()
            assert b.engine.entered.acquire(timeout=10)  # b's edit holds its files, at its engine
            return await decode(image, mask, deadline)

        a.service.decode = b_edits_meanwhile
        files = {"image": ("a.png", png_bytes(Image.new("RGB", (64, 64), red)), "image/png")}
        answer = a.http.post("/v1/images/edits", data={"prompt": "a", "size": "64x64"}, files=files)
        b.engine.gate.set()
        until(lambda: others, timeout=10)
        assert answer.status_code == 200, answer.text
        assert others[0].status_code == 200, others[0].text
        assert a.engine.calls[-1].specs[0].image.getpixel((0, 0)) == red  # got: b's blue


def test_a_spool_root_removed_under_the_server_is_no_500_for_every_large_body():
    """The server's spool folder is in the system's temporary folder; a cleaner (systemd-tmpfiles ages /tmp's
    entries out after 10 days; an idle server's folder is old) may remove it: the next request makes it again."""
    with InProcess() as app:
        shutil.rmtree(app.service.spool.root)
        body = json.dumps({"prompt": "p", "size": "64x64", "user": "u"}).encode() + b" " * (100 * 1024)
        answer = app.http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text


def test_a_spooled_body_under_max_rest_never_kills_its_decode_process():
    """A spooled JSON body's parsed rest comes back as a blob: in the reply's JSON header, escaped (é: 2 bytes, then
    `\\u00e9`, 6), one 360 KB string under MAX_LONG_TEXT and MAX_REST passed MAX_HEADER, and the server killed the
    worker as lost at every such request (an honest large body's parse: 28 ms, then 780 ms under four senders)."""
    body = json.dumps({"prompt": "p", "user": "é" * 180_000}, ensure_ascii=False).encode()
    with InProcess() as app:
        answer = app.http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert app.metric("image_server_decodes_killed_total") == 0
        assert answer.status_code == 400 and "decoder failed" not in answer.text, answer.text


def test_an_image_url_longer_than_openai_s_20_mib_is_still_refused_in_a_spooled_body():
    """OpenAI's spec bounds a JSON edit's image_url at 20 MiB of characters; a spooled body's data URL reaches the
    request model as its short marker, so the scanner applies the bound (a body of 64 KiB cannot pass it)."""
    side = 2600
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=0)
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    assert len(url) > IMAGE_URL_CHARS
    body = json.dumps({"prompt": "p", "size": "64x64", "images": [{"image_url": url}]}).encode()
    with InProcess() as app:
        answer = app.http.post("/v1/images/edits", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text[:200]
        assert answer.json()["error"]["param"] == "images[0].image_url"


def test_a_fifo_planted_as_a_server_s_lock_in_spool_dir_does_not_hold_the_start(tmp_path):
    """SPOOL_DIR defaults to the system's temporary folder, where any local user may make a folder named like a
    server's, with a FIFO as its lock: opened to be tried, it blocked the start for ever (until a writer came)."""
    planted = tmp_path / f"{PREFIX}planted"
    planted.mkdir()
    os.mkfifo(planted / LOCK)
    spool = Spool(str(tmp_path), InputBudget(2**20, 1.0, Metrics().input_disk, "disk"))
    starting = threading.Thread(target=spool.start, daemon=True)
    starting.start()
    starting.join(10)
    held = starting.is_alive()
    if held:  # a writer lets the thread go
        with open(planted / LOCK, "w"):
            pass
        starting.join(10)
    spool.close()
    assert not held, "the spool's start blocked on a FIFO named like a lock"
    assert planted.exists()  # not the server's to remove


def test_a_body_that_could_not_be_parsed_in_the_free_disk_is_refused_before_it_is_written(monkeypatch):
    """A spooled body's parse takes its size once more (what it may write beside it): a Content-Length that fits
    the free disk once but not twice was read and written whole, then refused."""
    with InProcess(max_body_mb=4, max_image_mb=1, input_disk_mb=10) as app:
        disk = app.service.spool.budget
        disk.take("someone-else", 6 * 2**20)  # other requests hold 6 MiB: 4 MiB free
        taken: list[int] = []
        take = disk.take
        monkeypatch.setattr(disk, "take", lambda tenant, size, own=0: (take(tenant, size, own), taken.append(size)))
        body = json.dumps({"prompt": "p", "size": "64x64"}).encode() + b" " * (3 * 2**20)  # fits once, not twice
        answer = app.http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert (answer.status_code, answer.json()["error"]["code"]) == (429, "input_disk_full"), answer.text
        assert taken == []  # nothing of it was kept
