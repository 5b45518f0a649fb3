"""Files of the served index damaged under a running service (issue 22: vectors overwritten inside
the merged cache were answered with 200 and ``reload_error: null``). The service's reload logic
(``idml.index.serving.IndexFollower``, what ``pipelines.serve`` polls) runs here in this process,
without Ray: a changed file withholds answers (503) until the version is checked again; a damaged
merged cache is then merged again, damaged shards leave it withholding and say so in /health."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess

import pytest
from support import build_in_process, make_checkpoint, make_index_dataset, overwrite_merged_vectors

from idml.index import IndexStore
from idml.index.serving import IndexChangedError, IndexFollower, ServedIndex

IDS = ["img-004", "img-017", "img-031"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    checkpoint = make_checkpoint(root / "tiny.pt")
    build_in_process(root / "idx", make_index_dataset(root / "ds", 40), checkpoint, index_type="ivf", nlist=4,
                     shards=2)
    return root


@pytest.fixture
def follower(built, tmp_path):
    """A service's follower over a private copy of the index (the checkpoint path stays the built one)."""
    subprocess.run(["cp", "-a", str(built / "idx"), str(tmp_path / "idx")], check=True)
    loads = []

    def load(version, previous):
        loads.append(version)
        return ServedIndex.load(tmp_path / "idx", version, previous=previous)

    follower = IndexFollower(tmp_path / "idx", load)
    follower.loads = loads
    return follower


def answers(served: ServedIndex):
    mu, u = served.lookup(IDS)
    return [[(h.id, round(h.cosine, 5)) for h in r.hits] for r in served.search(mu, u, 5, exclude=IDS)]


def overwrite_middle(path) -> None:
    """Other bytes over the middle of a file: the same size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 64:middle + 64] = bytes(reversed(data[middle - 64:middle + 64]))
    path.write_bytes(bytes(data))


def test_a_damaged_merged_cache_withholds_answers_until_it_is_merged_again(follower, caplog):
    served = follower.served
    before = answers(served)
    store = IndexStore(follower.store.root)
    merged = store.merged_dir(served.version) / "merged.ivfdata"
    assert merged in served.searcher.index.files  # answered from the merged cache
    overwrite_merged_vectors(merged.parent)
    with pytest.raises(IndexChangedError, match=f"{merged} of index v000001 changed on disk"):
        answers(served)  # never an answer read from the damaged file
    health = follower.health()
    assert health["status"] == "withholding answers" and health["changed_files"] == [str(merged)]
    with caplog.at_level(logging.WARNING):
        follower.poll()
    assert follower.served is not served and follower.reload_error is None
    assert f"checksum mismatch for {merged}" in caplog.text and "changed on disk: checked again" in caplog.text
    assert answers(follower.served) == before
    assert follower.health()["status"] == "ok" and follower.health()["changed_files"] == []
    follower.poll()
    assert follower.loads == [None, "v000001"]  # nothing changed since: not loaded again


def test_damaged_shards_leave_the_service_withholding_and_say_why(follower):
    served = follower.served
    before = answers(served)
    manifest = IndexStore(follower.store.root).read_manifest()
    shard = IndexStore(follower.store.root).version_dir("v000001") / manifest["shards"][0]["embeddings"]
    pristine = shard.read_bytes()
    overwrite_middle(shard)  # a source: it cannot be rebuilt
    follower.poll()
    assert follower.served is served and "is damaged: checksum mismatch for" in follower.reload_error
    health = follower.health()
    assert health["status"] == "withholding answers" and health["changed_files"] == [str(shard)]
    assert "not loaded: DamagedFileError" in health["reload_error"]
    with pytest.raises(IndexChangedError):
        answers(served)
    follower.poll()
    assert follower.loads == [None, "v000001"]  # the same damage is not hashed again at every poll
    shard.write_bytes(pristine)  # repaired: its stat changes again
    follower.poll()
    assert follower.reload_error is None and answers(follower.served) == before
    assert follower.loads == [None, "v000001", "v000001"]


def test_a_withheld_answer_is_a_503_with_one_line():
    from pipelines.serve import _index_changed

    response = asyncio.run(_index_changed(None, IndexChangedError("merged.ivfdata of index v000001 changed on disk")))
    assert response.status_code == 503
    assert json.loads(response.body) == {"detail": "merged.ivfdata of index v000001 changed on disk"}
