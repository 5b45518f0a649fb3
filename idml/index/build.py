"""The index build and update workflow, as one library function: ``build_index``.

Resolve the model and the corpus, open the staged build (``builder.StagedBuild``: the index lock,
a resumable staging folder), embed the corpus files that changed, finish (shards, recall,
manifest) and publish. The embedding step is passed in, as ``fit`` takes hooks: ``LocalEmbedding``
(one ``BatchEmbedder`` in this process) by default; ``pipelines.index.RayEmbedding`` runs it on a
Ray Data actor pool (``idml index build``).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import pyarrow as pa

from .corpus import OUTSIDE, Corpus, read_ids_and_images, resolve_corpus
from .embed import BatchEmbedder, describe_checkpoint, model_state
from .builder import StagedBuild
from .partitions import PartitionSink
from .reads import ReadPlan
from .request import BuildRequest
from .spec import IndexSpec, format_bytes
from .store import IndexStore


@dataclass
class Embedded:
    """What an embedding step reports: its time, and how it computed the vectors (actors, nodes:
    recorded in the manifest; None to record nothing)."""

    seconds: float
    manifest_entry: dict[str, Any] | None = None


class EmbeddingStep(Protocol):
    def __call__(self, corpus: Corpus, files: list[str], model: dict[str, Any], sink: PartitionSink,
                 known: pa.Table) -> Embedded:
        """Embed ``files`` of ``corpus`` with the checkpoint state ``model`` into ``sink`` (and close
        it); images whose (id, content hash) is in ``known`` are hashed, not embedded."""


@dataclass(frozen=True)
class LocalEmbedding:
    """The plain loop: every file through one ``BatchEmbedder`` in this process."""

    batch_size: int = 64
    threads: int = 0  # torch threads (0: torch's default)

    def __call__(self, corpus: Corpus, files: list[str], model: dict[str, Any] | str, sink: PartitionSink,
                 known: pa.Table | None) -> Embedded:
        """As ``EmbeddingStep``; ``model`` may also be a checkpoint's path."""
        started = time.time()
        embedder = BatchEmbedder(model, known=known, id_prefix=corpus.root if corpus.kind == "images" else None,
                                 threads=self.threads)
        for path in files:
            table = read_ids_and_images(corpus, path)
            for start in range(0, table.num_rows, self.batch_size):
                sink.add(embedder(table.slice(start, self.batch_size)))
        sink.close()
        return Embedded(time.time() - started)


@dataclass
class BuildIndexRequest:
    """What ``idml index build|update`` asks for. An update fills the checkpoint, corpus, splits
    and links choice it is not given from the published version (``BuildRequest.inputs``)."""

    index_dir: str | os.PathLike
    kind: str = "build"  # "build" (embed everything) or "update" (embed only new and changed images)
    checkpoint: str | None = None  # a path, a shared-storage URI or an MLflow model URI
    corpus: str | None = None  # a dataset folder, or a folder/URI of raw images
    splits: list[str] | None = None
    follow_links: bool | None = None
    # build only (an update keeps its parent's index): see BuildRequest
    index_type: str = "auto"
    max_index_bytes: int | None = None
    nlist: int | None = None
    train_size: int | None = None
    shards: int | None = None
    refine: int | None = None
    nprobe: int | None = None
    recall_sample: int = 256
    target_recall: float = 0.95
    max_query_ms: float | None = None
    wait_s: float = 0.0  # how long to wait for another writer of the index folder
    experiment: str | None = None  # MLflow experiment to log the run to; None: not logged
    tracking_uri: str | None = None


@dataclass
class BuildIndexResult:
    manifest: dict[str, Any]  # the published version's (an update with nothing to do: its parent's)
    published: bool  # False: an update found nothing changed in the corpus
    embedded: int = 0  # images this run embedded
    read_plan: ReadPlan | None = None  # None when the run published what an interrupted one had finished
    sink_counts: dict[str, int] = field(default_factory=dict)  # embedded, corrupt, known: as the sink counted them


def build_index(request: BuildIndexRequest, *, embed: EmbeddingStep | None = None,
                progress: Callable[[str], None] = print) -> BuildIndexResult:
    """Build or update the index in ``request.index_dir`` and publish the new version."""
    from .mlflow_log import IndexRun, index_params

    embed = embed or LocalEmbedding()
    store = IndexStore(request.index_dir)
    checkpoint_ref, corpus_uri, splits, follow_links = BuildRequest.inputs(
        request.kind, store, checkpoint=request.checkpoint, corpus=request.corpus, splits=request.splits,
        follow_links=request.follow_links)
    corpus = resolve_corpus(corpus_uri, splits, follow_links=follow_links)
    if corpus.outside:
        examples = ", ".join(os.path.relpath(p, corpus.root) for p in corpus.outside[:3])
        progress(f"skipped {len(corpus.outside)} image file(s) {OUTSIDE} {corpus.root} (links leading out of it: "
                 f"{examples}{', ...' if len(corpus.outside) > 3 else ''}); pass --follow-links to index them")
    checkpoint, model = load_model(checkpoint_ref)
    staged_request = BuildRequest(
        request.kind, checkpoint["embedding_dim"], checkpoint, corpus.describe(), index_type=request.index_type,
        nlist=request.nlist, nprobe=request.nprobe, train_size=request.train_size, shards=request.shards,
        recall_sample=request.recall_sample, target_recall=request.target_recall,
        max_index_bytes=request.max_index_bytes, max_query_ms=request.max_query_ms, refine=request.refine)

    with StagedBuild(store, staged_request, progress=progress, wait_s=request.wait_s) as staged:
        run = None
        if request.experiment:
            run = IndexRun.start(request.experiment, f"index-{request.kind}-{staged.key}",
                                 index_params(asdict(staged_request)), uri=request.tracking_uri)
        try:
            result = _embed_and_finish(staged, corpus, model, embed, progress)
        except BaseException as err:
            if run is not None:
                run.fail("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        if run is not None:
            if result.published:
                run.finish(result.manifest["metrics"], store.version_dir(result.manifest["version"]) / "manifest.json")
            else:
                run.finish({"images_embedded": result.embedded, "build_seconds": time.time() - staged.t_start})
    return result


def _embed_and_finish(staged: StagedBuild, corpus: Corpus, model: dict[str, Any], embed: EmbeddingStep,
                      progress: Callable[[str], None]) -> BuildIndexResult:
    if staged.finished_version:
        return BuildIndexResult(staged.publish_finished(), True)
    if staged.resumed:
        rows = sum(p.rows + len(p.corrupt) for p in staged.resumed)
        progress(f"resuming an interrupted {staged.request.kind}: {len(staged.resumed)} finished partition(s), "
                 f"{rows} images, reused")
    plan = staged.plan_reads(corpus)
    if plan.note:
        progress(plan.note)
    if plan.unchanged:
        progress(f"{plan.unchanged} of {plan.total} corpus file(s) unchanged since {staged.parent_version} "
                 "(size, mtime and checksum as recorded): not read")
    sink = staged.sink()
    if plan.files:
        embedded = embed(corpus, plan.files, model, sink, staged.known())
    else:
        sink.close()
        embedded = Embedded(0.0)
    count = sink.counts["embedded"]
    progress(f"read {len(plan.files)} corpus file(s); embedded {count} images in {embedded.seconds:.1f}s "
             f"({count / max(embedded.seconds, 1e-9):.1f} images/s); {sink.counts['corrupt']} corrupt, "
             f"{sink.counts['known']} already embedded")
    manifest = staged.finish(sink.listing(), embed_seconds=embedded.seconds, embedded_this_run=count,
                             embedding=embedded.manifest_entry)
    return BuildIndexResult(manifest, staged.published, count, plan, dict(sink.counts))


def load_model(ref: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint ``ref`` names (a path, a shared-storage URI, an MLflow model URI), loaded
    here: ``(what the manifest records, the state the embedding step gets)``. A download lives
    only until it is loaded: nothing downstream may depend on a file of this machine's."""
    from idml.checkpoint import load_checkpoint
    from idml.registry import describe_model, is_model_uri, resolve_checkpoint

    with tempfile.TemporaryDirectory(prefix="idml-model-") as downloads:
        local = resolve_checkpoint(ref, cache_dir=downloads)
        state = load_checkpoint(local)
        model = describe_model(ref) if is_model_uri(ref) else None
        described = describe_checkpoint(local, state, ref=ref, model=model)
    return described, model_state(state)


def format_build_summary(result: BuildIndexResult, *, nothing_published: str = "nothing published") -> str:
    """What a build or update did, for people: the index, what was embedded and reused, its recall."""
    manifest, c = result.manifest, result.manifest["counts"]
    spec = IndexSpec.from_dict(manifest["faiss"])
    state = "published" if result.published else "unchanged (up to date)"
    lines = [f"\nindex {manifest['version']} {state}"]
    tuned = f", {spec.search_param} {spec.search_value}" if spec.search_param else ""
    lines.append(f"  vectors {c['vectors']} in {c['shards']} shard(s), {spec.factory}{tuned}")
    if spec.choice:
        budget = f" (budget {format_bytes(spec.max_index_bytes)})" if spec.max_index_bytes else ""
        lines.append(f"  index chosen: {spec.choice}; estimated memory {format_bytes(spec.estimated_bytes)}{budget}")
    if not result.published:
        lines.append(f"  nothing changed in the corpus: reused all {c['vectors']} vectors; corrupt {c['corrupt']} "
                     f"({nothing_published})")
        return "\n".join(lines)
    m, r = manifest["metrics"], manifest["recall"]
    changes = "".join(f", {k} {c[k]}" for k in ("added", "changed", "removed") if k in c)
    lines.append(f"  images embedded {result.embedded} (this run){changes}; {_reused(manifest)}; corrupt {c['corrupt']}")
    if "files_read" in c:
        lines.append(f"  corpus files read {c['files_read']}, unchanged and not read {c['files_unchanged']}")
    if spec.kind.exact:
        recall = "exact search (recall 1)"
    else:
        within = f", within {r['max_query_ms']:g} ms" if r.get("max_query_ms") else ""
        target = (f" (target {r['target_recall']:g}{within}{'' if r.get('reached', True) else ': NOT reached'})"
                  if "target_recall" in r else "")
        latency = f"; {r['query_ms']:.2f} ms/query" if r.get("query_ms") is not None else ""
        recall = f"recall@10 vs exact {r['recall']:.4f} on {r['queries']} sampled vectors{target}{latency}"
    if r.get("refine"):
        recall += f"; lossy codes re-scored by exact cosine ({r['refine']}x k candidates)"
    vectors = f" + exact vectors {m['exact_vector_bytes'] / 2**20:.1f} MiB on disk" if m.get("exact_vector_bytes") else ""
    lines.append(f"  {recall}; index {m['index_bytes'] / 2**20:.1f} MiB{vectors}; {m['build_seconds']:.1f}s")
    lines += [f"  corrupt: {bad['id']}: {bad['reason']}" for bad in manifest.get("corrupt", [])[:10]]
    return "\n".join(lines)


def _reused(manifest: dict[str, Any]) -> str:
    """Vectors this run did not compute: the parent version's and an interrupted run's."""
    c = manifest["counts"]
    parts = [f"{c['reused']} from {manifest['parent']}" if c.get("reused") else "",
             f"{c['resumed']} from the interrupted run" if c.get("resumed") else ""]
    parts = [p for p in parts if p]
    total = c.get("reused", 0) + c.get("resumed", 0)
    return f"reused {total}" + (f" ({' + '.join(parts)})" if parts else "")
