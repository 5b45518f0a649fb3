"""Batch indexing: versioned, sharded faiss indexes of embedded image corpora (no Ray here;
``pipelines.index`` runs the embedding on Ray Data)."""

from ..faiss_import import faiss  # noqa: F401  (first: a missing faiss names the extras)
from .builder import StagedBuild
from .corpus import Corpus, resolve_corpus
from .embed import BatchEmbedder, content_hash
from .partitions import PartitionSink, embedding_table
from .request import BuildRequest
from .search import Hit, IndexSearcher, QueryResult, format_results
from .spec import IndexSpec, resolve_spec
from .store import IndexStore
from .verify import verify_against_corpus, verify_index

__all__ = [
    "BatchEmbedder", "BuildRequest", "Corpus", "Hit", "IndexSearcher", "IndexSpec", "IndexStore",
    "PartitionSink", "QueryResult", "StagedBuild", "content_hash", "embedding_table", "format_results",
    "resolve_corpus", "resolve_spec", "verify_against_corpus", "verify_index",
]
