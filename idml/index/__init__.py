"""Batch indexing: versioned, sharded faiss indexes of embedded image corpora (no Ray here;
``pipelines.index`` runs the embedding on Ray Data)."""

try:
    import faiss  # noqa: F401
except ImportError as e:  # neither extra installed: say which to choose, not just the missing name
    raise ImportError("idml's indexes need faiss, which comes with an extra: `pip install 'idml[cpu]'` (faiss-cpu), "
                      "or `pip install 'idml[gpu]'` on a CUDA 12 machine (faiss-gpu-cu12); not both: they share "
                      "the `faiss` package") from e

from .builder import BuildRequest, StagedBuild
from .corpus import Corpus, resolve_corpus
from .embed import BatchEmbedder, content_hash
from .faiss_index import IndexSpec, resolve_spec
from .partitions import PartitionSink, embedding_table
from .search import Hit, IndexSearcher, QueryResult, format_results
from .store import IndexStore
from .verify import verify_against_corpus, verify_index

__all__ = [
    "BatchEmbedder", "BuildRequest", "Corpus", "Hit", "IndexSearcher", "IndexSpec", "IndexStore",
    "PartitionSink", "QueryResult", "StagedBuild", "content_hash", "embedding_table", "format_results",
    "resolve_corpus", "resolve_spec", "verify_against_corpus", "verify_index",
]
