"""server/video_store.py: video jobs on disk, per owner, kept across restarts, within VIDEO_TTL and VIDEO_DIR_MAX_MB."""

import time

import pytest

from server.errors import APIError
from server.protocol import Video
from server.video_store import VideoJob, VideoParams, VideoStore, new_id

PARAMS = VideoParams(width=64, height=64, frames=5, fps=8, steps=2, guidance=5.0, seed=1)
FILES = {"video": b"v" * 600, "thumbnail": b"t" * 100, "spritesheet": b"s" * 300}  # 1000 bytes


def job(owner: str = "alice", created: float | None = None, reference: bool = False) -> VideoJob:
    now = created or time.time()
    fields = dict(model="m", status="queued", progress=0, prompt="p", seconds="0.5", size="64x64")
    video = Video(id=new_id(), created_at=int(now), **fields)
    return VideoJob(video=video, owner=owner, params=PARAMS.model_copy(update={"reference": reference}), created=now)


def stored(store: VideoStore, owner: str = "alice", files: dict | None = None) -> str:
    one = job(owner)
    store.add(one, None)
    if files is not None:
        assert store.complete(one.video.id, files)
    return one.video.id


def test_a_restart_keeps_finished_jobs_and_fails_unfinished_ones(tmp_path):
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    done = stored(store, files=FILES)
    running = stored(store)
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    assert store.load() == 2
    video = store.get(done, "alice").video
    assert (video.status, video.progress) == ("completed", 100)
    assert video.expires_at == video.completed_at + 3600
    assert store.path(store.get(done, "alice"), "video").read_bytes() == FILES["video"]
    assert store.used_bytes == 1000
    failed = store.get(running, "alice").video
    assert failed.status == "failed" and failed.error.code == "server_restarted" and failed.expires_at


def test_another_owner_sees_nothing(tmp_path):
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    mine = stored(store, "alice")
    assert store.get(mine, "bob") is None and store.get(mine, "alice") is not None
    assert store.page("bob", None, 10, "asc") == ([], False)
    with pytest.raises(APIError) as err:  # nor can it page from another owner's job
        store.page("bob", mine, 10, "asc")
    assert err.value.param == "after"


def test_pages_follow_creation_order_both_ways(tmp_path):
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    ids = [stored(store) for _ in range(5)]
    first, more = store.page("alice", None, 2, "asc")
    assert [j.video.id for j in first] == ids[:2] and more
    rest, more = store.page("alice", ids[1], 10, "asc")
    assert [j.video.id for j in rest] == ids[2:] and not more
    newest, more = store.page("alice", None, 3, "desc")
    assert [j.video.id for j in newest] == ids[:1:-1] and more
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    store.load()  # the same order after a restart, though all were created within one second
    assert [j.video.id for j in store.page("alice", None, 10, "asc")[0]] == ids


def test_the_oldest_finished_jobs_go_first_when_the_quota_is_full(tmp_path):
    store = VideoStore(tmp_path, ttl=3600, max_bytes=2500)
    old, newer = stored(store, files=FILES), stored(store, files=FILES)
    waiting = stored(store)  # unfinished jobs are never evicted
    newest = stored(store, files=FILES)
    assert store.get(old, "alice") is None and not (tmp_path / old).exists()
    assert all(store.get(i, "alice") for i in (newer, waiting, newest))
    assert store.used_bytes == 2000


def test_a_video_larger_than_the_quota_fails_its_job(tmp_path):
    store = VideoStore(tmp_path, ttl=3600, max_bytes=500)
    video_id = stored(store)
    assert not store.complete(video_id, FILES)
    failed = store.get(video_id, "alice").video
    assert failed.status == "failed" and failed.error.code == "video_too_large"
    assert "VIDEO_DIR_MAX_MB" in failed.error.message


def test_a_job_deleted_while_it_was_encoded_leaves_nothing(tmp_path):
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    video_id = stored(store)
    store.delete(video_id)
    assert not store.complete(video_id, FILES)
    assert list(tmp_path.iterdir()) == [] and store.used_bytes == 0


def test_expired_jobs_are_deleted_with_their_files(tmp_path):
    store = VideoStore(tmp_path, ttl=1, max_bytes=10**6)
    video_id = stored(store, files=FILES)
    kept = stored(store)  # unfinished: no expiry yet
    assert store.expire() == 0
    store.get(video_id, "alice").video.expires_at = int(time.time()) - 1
    assert store.expire() == 1
    assert store.get(video_id, "alice") is None and not (tmp_path / video_id).exists()
    assert store.get(kept, "alice") is not None


def test_the_reference_image_is_kept_for_a_remix(tmp_path):
    store = VideoStore(tmp_path / "store", ttl=3600, max_bytes=10**6)
    sent = tmp_path / "request-file"  # the request's file, removed when the request ends
    sent.write_bytes(b"png bytes")
    one = job(reference=True)
    store.add(one, sent)
    sent.unlink()
    assert store.reference(one).read_bytes() == b"png bytes" and store.used_bytes == len(b"png bytes")
    assert store.reference(job()) is None


def test_foreign_folders_are_ignored(tmp_path):
    (tmp_path / "lost+found").mkdir()
    (tmp_path / f"video_{'0' * 48}").mkdir()  # a job folder without its job.json
    store = VideoStore(tmp_path, ttl=3600, max_bytes=10**6)
    assert store.load() == 0
