import dataclasses

import pytest
from support import embed_in_process, make_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def planned_build():
    """A build/update the way ``idml index`` runs one, without Ray: ``plan_reads`` picks the files,
    only those are read. Returns ``(manifest, plan, sink counts, published)``."""
    from idml.index import BuildRequest, IndexStore, StagedBuild, resolve_corpus
    from idml.index.embed import describe_checkpoint

    def run(index_dir, corpus_uri, checkpoint, kind="build", **options):
        corpus = resolve_corpus(corpus_uri)
        ckpt = describe_checkpoint(checkpoint)
        request = BuildRequest(kind, ckpt["embedding_dim"], ckpt, corpus.describe(), **options)
        with StagedBuild(IndexStore(index_dir), request) as staged:
            plan = staged.plan_reads(corpus)
            sink = staged.sink()
            embed_in_process(dataclasses.replace(corpus, files=plan.files), checkpoint, sink, staged.known())
            manifest = staged.finish(sink.listing(), embedded_this_run=sink.counts["embedded"])
            return manifest, plan, dict(sink.counts), staged.published

    return run
