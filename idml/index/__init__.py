"""Batch indexing: versioned, sharded faiss indexes of embedded image corpora (no Ray here;
``pipelines.index`` runs the embedding on Ray Data)."""

from ..faiss_import import faiss  # noqa: F401  (first: a missing faiss names the extras)
from .build import BuildIndexRequest, BuildIndexResult, LocalEmbedding, build_index
from .builder import StagedBuild
from .corpus import Corpus, resolve_corpus
from .embed import BatchEmbedder, content_hash
from .partitions import PartitionSink, embedding_table
from .query import QueryRequest, QueryResponse, query_index
from .request import BuildRequest
from .search import Hit, IndexSearcher, QueryResult, format_results
from .spec import IndexSpec, resolve_spec
from .store import IndexStore
from .verify import VerifyRequest, VerifyResult, verify_against_corpus, verify_index, verify_version
from .versions import list_versions, prune_versions, publish_version

__all__ = [
    "BatchEmbedder", "BuildIndexRequest", "BuildIndexResult", "BuildRequest", "Corpus", "Hit", "IndexSearcher",
    "IndexSpec", "IndexStore", "LocalEmbedding", "PartitionSink", "QueryRequest", "QueryResponse", "QueryResult",
    "StagedBuild", "VerifyRequest", "VerifyResult", "build_index", "content_hash", "embedding_table", "format_results",
    "list_versions", "prune_versions", "publish_version", "query_index", "resolve_corpus", "resolve_spec",
    "verify_against_corpus", "verify_index", "verify_version",
]
