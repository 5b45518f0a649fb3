#!/usr/bin/env bash
# The GPU paths end to end on tiny generated data, in under 10 minutes, with throughput ratios
# against the CPU (one machine with an NVIDIA GPU; nothing is downloaded):
#
#   1. training: a Ray Train job with one GPU worker (DDP over nccl) steps the IDML model and loss
#      under autocast (bf16, or fp16 with a grad scaler); then `pipelines.train.train_ray` on GPU
#      vs on CPU, images/s of the best epoch after the first. (idml's epoch loop itself trains in
#      fp32: the autocast step shows the model and losses are fit for it.)
#   2. embedding: BatchEmbedder on CUDA (autocast) vs CPU, the model alone and decode + model, and
#      how close the mixed-precision vectors are to fp32 ones;
#   3. `idml index build --gpu` (one GPU actor through Ray Data, the model via the object store)
#      and `idml index query --gpu`;
#   4. faiss: exact search of 200k x 512 vectors on GPU vs CPU (queries/s, same neighbours), and
#      IVF k-means on the GPU.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter than .venv's
#   bash benchmarks/gpu_check.sh faiss      # only the checks whose name holds one of the words
#
# Exit 0 when every check passed (or when the machine has no GPU: it says so and checks nothing),
# 1 when one failed. faiss steps need faiss-gpu: `pip uninstall faiss-cpu && pip install -e '.[gpu]'`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none): nothing to check"
  exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: nvidia-smi sees a GPU but torch cannot use it (a CPU-only torch build, or a driver too old for its CUDA):"
  nvidia-smi -L
  "$PY" -c "import torch; print('torch', torch.__version__, 'built for CUDA', torch.version.cuda)"
  exit 1
fi

exec timeout --kill-after=20 590 "$PY" - "$@" <<'PY'
import json, logging, os, sys, tempfile, time, traceback, warnings
from pathlib import Path

sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "benchmarks")]
warnings.simplefilter("ignore")
logging.basicConfig(level=logging.WARNING)
for noisy in ("ray", "ray.data", "ray.train", "faiss.loader", "mlflow"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

import numpy as np
import torch

START = time.time()
ONLY = [word.lower() for word in sys.argv[1:]]
WORK = Path(tempfile.mkdtemp(prefix="idml-gpu-check-"))
CPUS = os.cpu_count() or 2
results = []


def check(name):
    """Runs the decorated function at once, as one named check: PASS with its line, or FAIL."""
    def run(fn):
        if ONLY and not any(word in name.lower() for word in ONLY):
            return
        t = time.time()
        try:
            line = fn()
            results.append((name, True))
            print(f"PASS {name} ({time.time() - t:.0f}s): {line}", flush=True)
        except Exception as e:  # a failed check is reported, the next one still runs
            results.append((name, False))
            print(f"FAIL {name} ({time.time() - t:.0f}s): {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
    return run


import faiss
from idml.index import faiss_index as fx

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}; "
      f"bf16: {torch.cuda.is_bf16_supported()}; faiss {faiss.__version__} sees {fx.gpu_count()} GPU(s); {CPUS} CPUs; "
      f"work folder {WORK}", flush=True)
FAISS_GPU = fx.gpu_count() > 0

RAY = None


def ray_session():
    """Ray, started by the first check that needs it."""
    global RAY
    if RAY is None:
        from pipelines._ray import init_ray

        RAY = init_ray(dashboard=True)  # Ray Train's controller asks the dashboard's state API about its workers
        RAY.data.DataContext.get_current().enable_progress_bars = False
    return RAY

TRAIN_OVERRIDES = ["data.image_size=64", "model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=128",
                   "train.batch_size=32", "train.images_per_class=4", "train.warmup_epochs=0", "eval.nmi=false",
                   "eval.batch_size=64", "eval.recall_ks=[1]"]


@check("training step: DDP over nccl, one GPU worker, autocast")
def _():
    ray_session()
    import ray.train
    from ray.train.torch import TorchTrainer

    def probe(config):
        import json
        import math
        from pathlib import Path

        import torch
        import torch.distributed as dist
        import ray.train
        import ray.train.torch
        from idml.config import load_config
        from idml.training.setup import build_training

        device = ray.train.torch.get_device()
        cfg = load_config(overrides=config["overrides"])
        state = build_training(cfg, num_classes=8, device=device)
        # As the training worker wraps it (pipelines.train_worker): unused parameters are searched only
        # when the loss ignores the uncertainty head.
        ddp = torch.nn.parallel.DistributedDataParallel(state.objective, device_ids=[device.index],
                                                        find_unused_parameters=not state.objective.criterion.uses_uncertainty)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        torch.manual_seed(0)
        images = torch.rand(32, 3, 64, 64, device=device)
        labels = torch.arange(8, device=device).repeat_interleave(4)
        losses = []
        for _ in range(5):
            state.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                loss, _ = ddp(images, labels)
            scaler.scale(loss).backward()
            scaler.step(state.optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        # A file, not ray.train.report: Train V2 keeps reported metrics only with a checkpoint.
        Path(config["out"]).write_text(json.dumps({
            "backend": dist.get_backend(), "dtype": str(dtype), "device": str(device), "loss_first": losses[0],
            "loss_last": losses[-1], "finite": all(math.isfinite(v) for v in losses)}))

    out = WORK / "probe.json"
    trainer = TorchTrainer(probe, train_loop_config={"overrides": TRAIN_OVERRIDES, "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True),
                           run_config=ray.train.RunConfig(name="gpu-check-probe", storage_path=str(WORK / "ray")))
    trainer.fit()
    m = json.loads(out.read_text())
    assert m["backend"] == "nccl", f"backend {m['backend']}, expected nccl"
    assert m["finite"] and m["device"].startswith("cuda"), m
    return f"backend {m['backend']} on {m['device']}, {m['dtype']}: loss {m['loss_first']:.3f} -> {m['loss_last']:.3f} in 5 steps"


@check("training throughput: train_ray, one worker, GPU vs CPU")
def _():
    ray_session()
    from idml.config import load_config
    from pipelines.train import RayOptions, train_ray
    from train_throughput import make_dataset

    data = make_dataset(WORK / "train-data", 16, 24, 64)
    speeds = {}
    for name, options, threads in (("gpu", dict(use_gpu=True, cpus_per_worker=2), 2),
                                   ("cpu", dict(cpus_per_worker=max(1, CPUS - 2)), max(1, CPUS - 2))):
        cfg = load_config(overrides=TRAIN_OVERRIDES + [f"data.dataset={data}", "train.epochs=3", "train.eval_every=3",
                                                       f"train.threads={threads}", f"output_dir={WORK / ('train-' + name)}"])
        summary = train_ray(cfg, RayOptions(num_workers=1, tracking_uri=f"sqlite:///{WORK / 'mlflow.db'}",
                                            run_name=f"gpu-check-{name}", **options), resume=False)
        by_epoch = [h["train/images_per_s"] for h in summary["history"]]
        speeds[name] = max(by_epoch[1:] or by_epoch)
    return (f"images/s GPU {speeds['gpu']:.0f}, CPU ({max(1, CPUS - 2)} threads) {speeds['cpu']:.0f}: "
            f"ratio {speeds['gpu'] / speeds['cpu']:.1f}x (tiny images: data loading bounds the GPU)")


CORPUS = CHECKPOINT = None


@check("embedding: BatchEmbedder on CUDA (autocast) vs CPU")
def _():
    global CORPUS, CHECKPOINT
    import pyarrow as pa
    import pyarrow.parquet as pq
    from embed_throughput import make_checkpoint, make_corpus
    from idml.data.images import decode_image
    from idml.index import resolve_corpus
    from idml.index.embed import BatchEmbedder

    CORPUS = make_corpus(WORK / "corpus", 1024, 96)
    CHECKPOINT = make_checkpoint(WORK / "model.pt", "resnet18", 512, 64)
    table = pa.concat_tables([pq.read_table(p, columns=["id", "image"]) for p in resolve_corpus(CORPUS).files])
    out = {}
    for device in ("cuda", "cpu"):
        embedder = BatchEmbedder(CHECKPOINT, device=device, threads=CPUS if device == "cpu" else 0)
        tensors = torch.stack([embedder.transform(decode_image(b)) for b in table.column("image").to_pylist()])
        embedder.embed_tensors(tensors[:64])  # warm-up (cuDNN autotuning, allocator)
        t = time.perf_counter()
        mu = np.concatenate([embedder.embed_tensors(tensors[i:i + 128])[0] for i in range(0, len(tensors), 128)])
        if device == "cuda":
            torch.cuda.synchronize()
        model_s = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, table.num_rows, 128):
            embedder(table.slice(i, 128))
        out[device] = (len(tensors) / model_s, table.num_rows / (time.perf_counter() - t), mu, embedder.autocast_dtype)
    cos = np.sum(out["cuda"][2] * out["cpu"][2], axis=1) / (
        np.linalg.norm(out["cuda"][2], axis=1) * np.linalg.norm(out["cpu"][2], axis=1))
    assert out["cuda"][3] is not None and out["cpu"][3] is None, "autocast must be on for CUDA only"
    assert cos.min() > 0.99, f"mixed-precision vectors differ from fp32 ones: min cosine {cos.min():.4f}"
    return (f"model alone {out['cuda'][0]:.0f} vs {out['cpu'][0]:.0f} images/s ({out['cuda'][0] / out['cpu'][0]:.1f}x); "
            f"decode + model {out['cuda'][1]:.0f} vs {out['cpu'][1]:.0f} ({out['cuda'][1] / out['cpu'][1]:.1f}x); "
            f"{out['cuda'][3]} vs fp32 cosine >= {cos.min():.4f}")


@check("idml index build --gpu / query --gpu (Ray Data, one GPU actor)")
def _():
    from idml.index import IndexStore
    from pipelines.index_cli import main

    assert CORPUS, "the embedding check made no corpus"
    ray_session()
    idx = WORK / "index"
    assert main(["build", "--index-dir", str(idx), "--checkpoint", CHECKPOINT, "--corpus", CORPUS, "--gpu",
                 "--actors", "1", "--batch-size", "128", "--no-mlflow"]) == 0
    m = IndexStore(idx).read_manifest()
    assert "GPU" in m["embedding"]["actors"], m["embedding"]
    line = f"{m['counts']['vectors']} vectors at {m['metrics']['embed_images_per_s']:.0f} images/s with {m['embedding']['actors']}"
    if FAISS_GPU:
        assert main(["query", "--index-dir", str(idx), "--ids", "img-000000", "--k", "5", "--gpu"]) == 0
        line += "; query --gpu OK"
    else:
        line += "; query --gpu skipped (faiss-cpu)"
    return line


@check("faiss: exact search on GPU vs CPU, IVF k-means on GPU")
def _():
    if not FAISS_GPU:
        raise RuntimeError(f"{fx.gpu_status()[1]}; with faiss-cpu: `pip uninstall -y faiss-cpu && pip install -e '.[gpu]'`")
    rng = np.random.default_rng(0)
    n, d, shards = 200_000, 512, 4
    x = rng.standard_normal((n, d), dtype=np.float32)
    faiss.normalize_L2(x)
    q = x[rng.choice(n, 2000, replace=False)] + 0.05 * rng.standard_normal((2000, d), dtype=np.float32)
    faiss.normalize_L2(q)
    spec = fx.IndexSpec("flat", d)
    parts = np.array_split(x, shards)
    labels = {}
    qps = {}
    for gpu in (False, True):
        combined = fx.combine([fx.build_shard(p, s, spec, None) for s, p in enumerate(parts)], spec, None, gpu=gpu)
        combined.search(q[:10], 10)
        t = time.perf_counter()
        _, labels[gpu] = combined.search(q, 10)
        qps[gpu] = len(q) / (time.perf_counter() - t)
    same = float(np.mean(labels[True][:, 0] == labels[False][:, 0]))
    assert same > 0.99, f"GPU and CPU top-1 agree on only {same:.1%} of queries"
    ivf = fx.resolve_spec("ivf", n, d, nlist=1024)
    t = time.perf_counter()
    fx.train_index(x[:ivf.train_size], ivf)
    kmeans_s = time.perf_counter() - t
    return (f"{n} x {d} Flat, {shards} shards: {qps[True]:.0f} vs {qps[False]:.0f} queries/s ({qps[True] / qps[False]:.1f}x), "
            f"top-1 agree {same:.1%}; k-means {ivf.factory} on {ivf.train_size} vectors {kmeans_s:.1f}s on the GPU")


if RAY is not None:
    RAY.shutdown()
failed = [name for name, ok in results if not ok]
print(f"\ngpu_check: {len(results) - len(failed)}/{len(results)} passed in {time.time() - START:.0f}s"
      + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
sys.exit(1 if failed else 0)
PY
