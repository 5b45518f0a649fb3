"""faiss, which comes with an extra (``idml[cpu]`` or ``idml[gpu]``, never both: they share the
``faiss`` package). Every module imports it from here, so its absence says which to install."""

try:
    import faiss
except ImportError as e:  # neither extra installed: say which to choose, not just the missing name
    raise ImportError("idml needs faiss, which comes with an extra: `pip install 'idml[cpu]'` (faiss-cpu), "
                      "or `pip install 'idml[gpu]'` on a CUDA 12 machine (faiss-gpu-cu12); not both: they share "
                      "the `faiss` package") from e

__all__ = ["faiss"]
