"""server/storage.py: images served by URL, kept for IMAGE_TTL and within IMAGE_DIR_MAX_MB."""

import os
import time

from server.storage import ImageStore


def test_the_oldest_images_go_first_when_the_quota_is_full(tmp_path):
    store = ImageStore(tmp_path, ttl=3600, max_bytes=2500)
    names = [store.save(bytes(1000), "png") for _ in range(2)]
    os.utime(tmp_path / names[0], (time.time() - 10, time.time() - 10))
    store = ImageStore(tmp_path, ttl=3600, max_bytes=2500)  # a restart counts what the last run left
    newest = store.save(bytes(1000), "png")
    assert store.path(names[0]) is None and store.path(names[1]) and store.path(newest)
    assert store.used_bytes == 2000 == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_expired_images_are_deleted_and_not_served(tmp_path):
    store = ImageStore(tmp_path, ttl=60, max_bytes=10**6)
    old, fresh = store.save(b"a", "jpeg"), store.save(b"b", "jpeg")
    os.utime(tmp_path / old, (time.time() - 120, time.time() - 120))
    assert store.path(old) is None  # another instance sharing the folder tells from the file
    store = ImageStore(tmp_path, ttl=60, max_bytes=10**6)  # after a restart
    assert store.expire() == 1
    assert not (tmp_path / old).exists() and store.path(fresh)
    assert store.path("../../etc/passwd") is None


def test_an_image_larger_than_the_quota_comes_back_inline(tmp_path):
    from server.protocol import Usage
    from server.respond import Finished, response
    from server.rules import Output

    store = ImageStore(tmp_path, ttl=60, max_bytes=10)
    finished = Finished([b"x" * 100], [1], [[]], [False], "64x64", Usage.of_images(0, 16))
    item = response(finished, Output("png", 0, "url", "http://h", "high"), store).data[0]
    assert item.b64_json and item.url is None and "IMAGE_DIR_MAX_MB" in item.model_extra["url_error"]
