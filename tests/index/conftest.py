import pytest
from support import make_checkpoint, run_build


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def planned_build():
    """A build/update the way ``idml index`` runs one, without Ray. Returns ``(manifest, read plan,
    sink counts, published)``."""

    def run(index_dir, corpus_uri, checkpoint, kind="build", **options):
        result = run_build(index_dir, corpus_uri, checkpoint, kind, **options)
        return result.manifest, result.read_plan, result.sink_counts, result.published

    return run
