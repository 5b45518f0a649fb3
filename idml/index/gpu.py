"""Which GPUs faiss can use. With ``faiss-gpu`` (``pip install 'idml[gpu]'``) k-means, the
expensive part of an IVF build, runs on every GPU faiss sees, and an exact (Flat) index is
searched on them when asked (``combine(..., gpu=True)``, ``idml index query --gpu``)."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys

from ..faiss_import import faiss

log = logging.getLogger(__name__)

# One exact search on the GPUs, in a child process: a faiss GPU kernel missing for the card
# aborts the process that launches it instead of raising.
_GPU_PROBE = """
import numpy as np, faiss
x = np.random.default_rng(0).random((64, 16), dtype=np.float32)
index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(16))
index.add(x)
assert (index.search(x[:4], 1)[1][:, 0] >= 0).all()
"""


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[int, str]:
    """(GPUs faiss can use, why none where faiss sees some). 0 with faiss-cpu; 0 too, with the
    reason logged, when faiss's GPU kernels do not run on the cards: the PyPI faiss-gpu-cu12
    wheels carry kernels for compute capability 7.x-8.x only, and on a Hopper card (H100, H200)
    their first kernel aborts the process ("no kernel image is available", seen on an H200).
    So one tiny search runs in a child process first, once per process."""
    seen = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not seen:
        return 0, "faiss-cpu is installed, or faiss sees no GPU"
    try:
        probe = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, timeout=300)
        last = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        failure = "" if probe.returncode == 0 else last.split("details: ", 1)[-1]  # faiss's assertions end with it
    except subprocess.TimeoutExpired:
        failure = "a search of 64 vectors took over 300 s"
    if not failure:
        return seen, ""
    reason = (f"faiss sees {seen} GPU(s) but cannot run its kernels on them ({failure[:300]}); its GPU builds "
              "from PyPI lack kernels for Hopper (H100, H200) and newer cards: install faiss-gpu from "
              "conda-forge, or build faiss with CUDA_ARCHITECTURES for the card")
    log.warning("%s; using the CPU", reason)
    return 0, reason


def gpu_count() -> int:
    """GPUs faiss can use (``gpu_status``)."""
    return gpu_status()[0]
