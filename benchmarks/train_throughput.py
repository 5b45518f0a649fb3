"""Training throughput at the main job's settings: the local loop, the Ray path and a plain
PyTorch loop, side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 52 --repeats 2 --json out.json]

By default everything is the main job's (``configs/emoji.yaml``: EfficientNet-Lite0 with its
ImageNet weights, 128 px, frozen BN, batch 64 of 16 classes x 4, ``train.precision: auto``,
``channels_last``) on the built-in emoji set (``idml data fetch emoji`` first), and every
contender gets the whole machine:

  (a) ``idml.training.local.train_local``: the local loop over a torch DataLoader (``--loader-workers``
      decoding processes, torch threads = the machine's CPUs);
  (b) ``pipelines.train.train_ray``: Ray Data packs, decodes and augments, one Ray Train worker
      runs the same loop with the threads ``pipelines.train.worker_threads`` gives it;
  (c) a plain PyTorch loop in the style of the reference script (``../shared/idml-reference.md``):
      DataLoader + MPerClassSampler, the same backbone, one linear head, pytorch-metric-learning's
      FastAP, AdamW, the same precision and threads. It measures what the library adds.

Each contender trains two epochs of ``--steps`` steps: the first trains only the heads (the
main job's warm-up), the second the whole network; both epochs' images/s are printed (the
training loop's own measure: data waits included, evaluation excluded). The contenders run
``--repeats`` times, alternately, so load from elsewhere hits all alike; the best run of each
counts. Printed: (b)/(a) (target >= 0.95) and (a)/(c) (target >= 0.95), the load average
around each run, and peak memory: the proportional set size (PSS) of each run's whole process
tree and the peak resident size of its biggest single process. ``--dataset``/``--backbone``/
``--image-size`` etc. measure other settings (``--dataset synthetic`` generates one).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idml.config import load_config  # noqa: E402
from idml.data import ImageRecord, write_dataset  # noqa: E402


def make_dataset(root: Path, classes: int, per_class: int, size: int) -> str:
    """Class-contiguous shards (as the converters write them) of coloured squares on noise."""
    records = []
    for label in range(classes + classes // 8 + classes // 4):
        split = "train" if label < classes else "val" if label < classes + classes // 8 else "test"
        base = np.random.default_rng(label).integers(40, 216, 3)
        for i in range(per_class if split == "train" else 8):
            rng = np.random.default_rng(label * 1000 + i)
            img = rng.integers(0, 60, (size, size, 3)).astype(np.int16)
            x0, y0 = (label * 7) % (size // 2), (label * 3) % (size // 2)
            img[y0:y0 + size // 2, x0:x0 + size // 2] += base.astype(np.int16)
            out = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, format="PNG")
            records.append(ImageRecord(id=f"{label}/{i}", image=out.getvalue(), label=label,
                                       class_name=f"c{label}", domain="default", split=split))
    write_dataset(records, root, name="bench", shard_bytes=4 << 20)
    return str(root)


class MemorySampler:
    """Peak PSS of this process tree, and peak RSS of its biggest single process."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_total = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            parents = {}
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    try:
                        parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except OSError:
                        continue
            pss = rss = 0
            for pid in (p for p in parents if self._descends(p, me, parents)):
                try:
                    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                except OSError:
                    continue
                kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith("kB")}
                pss += kib.get("Pss", 0) * 1024
                rss = max(rss, kib.get("Rss", 0) * 1024)
            self.peak_total = max(self.peak_total, pss)
            self.peak_single = max(self.peak_single, rss)
            self._stop.wait(self.interval)

    @staticmethod
    def _descends(pid, root, parents):
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False


def plain_loop(cfg, *, steps: int, epochs: int, threads: int, loader_workers: int) -> dict:
    """(c): the reference script's loop, with the library's model builder for the same weights."""
    import torch
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.samplers import MPerClassSampler
    from torch.utils.data import DataLoader

    from idml.data import ImageShardDataset, resolve_dataset
    from idml.model import build_model
    from idml.precision import autocast, autocast_dtype
    from idml.transforms import train_transform

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    t = cfg.train
    root = resolve_dataset(cfg.data.dataset)  # a built-in name or a folder
    dataset = ImageShardDataset(root, "train", transform=train_transform(cfg.data.image_size))
    loader = DataLoader(dataset, batch_size=t.batch_size, drop_last=True, num_workers=loader_workers,
                        persistent_workers=loader_workers > 0,
                        sampler=MPerClassSampler(dataset.targets, m=t.images_per_class, batch_size=t.batch_size,
                                                 length_before_new_iter=len(dataset)))
    model = build_model(cfg.model.backbone, embedding_dim=cfg.model.embedding_dim).to(memory_format=torch.channels_last)
    head = model.semantic_head
    loss_fn = losses.FastAPLoss(num_bins=10)
    optimizer = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": t.lr * t.backbone_lr_multiplier},
                                   {"params": head.parameters(), "lr": t.lr}], weight_decay=t.weight_decay)
    dtype = autocast_dtype("cpu", t.precision)
    history = []
    for epoch in range(epochs):
        model.set_backbone_trainable(epoch >= t.warmup_epochs)
        model.train()
        images = 0
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            x = x.float().div_(255).contiguous(memory_format=torch.channels_last)
            with autocast("cpu", dtype):
                feats = model.pooled_features(x)
            embeddings = torch.nn.functional.normalize(head(feats.float()), dim=1)
            loss = loss_fn(embeddings, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(y)
            if step + 1 >= steps:
                break
        history.append({"epoch": epoch, "train/images_per_s": images / (time.perf_counter() - start),
                        "train/images": images})
    return {"history": history}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "emoji.yaml"))
    parser.add_argument("--dataset", default=None, help="default: the config's (emoji); 'synthetic' generates one")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's (128)")
    parser.add_argument("--backbone", default=None, help="default: the config's (efficientnet_lite0)")
    parser.add_argument("--precision", default=None, help="default: the config's (auto)")
    # A whole emoji epoch by default: Ray Data starts its pipeline again every epoch, which a short
    # epoch would weigh far more than a real run does (20-step epochs read 0.72 of the local loop).
    parser.add_argument("--steps", type=int, default=52, help="training steps per epoch (52: a whole emoji epoch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (default: every CPU)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader decoding processes in (a) and (c)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; the best of each counts")
    parser.add_argument("--only", default="abc", help="which contenders to run, e.g. ab")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data logs every execution at INFO
    warnings.simplefilter("ignore", DeprecationWarning)

    import ray

    from idml.training.local import train_local
    from pipelines.train import RayOptions, train_ray

    work = Path(tempfile.mkdtemp(prefix="idml-train-bench-"))
    dataset = args.dataset
    if dataset == "synthetic":
        dataset = make_dataset(work / "data", 48, 16, args.image_size or 128)
    overrides = [
        *([f"data.dataset={dataset}"] if dataset else []),
        *([f"data.image_size={args.image_size}"] if args.image_size else []),
        *([f"model.backbone={args.backbone}"] if args.backbone else []),
        *([f"train.precision={args.precision}"] if args.precision else []),
        f"data.workers={args.loader_workers}", "train.epochs=2", "train.warmup_epochs=1",
        f"train.max_steps_per_epoch={args.steps}", "train.eval_every=2",
        # The test pass at the end is not what is measured here: point it at the small val split.
        "data.test_split=val", "eval.nmi=false",
    ]
    results: dict = {}

    def run(name, fn, out):
        cfg = load_config(args.config, overrides=overrides + [f"output_dir={work / out}"])
        load_before = os.getloadavg()[0]
        with MemorySampler() as memory:
            start = time.perf_counter()
            summary = fn(cfg)
            wall = time.perf_counter() - start
        by_epoch = [h["train/images_per_s"] for h in summary["history"]]
        r = {
            "images_per_s_heads_only": by_epoch[0],
            "images_per_s": by_epoch[-1],  # the whole network trains: what most of a run costs
            "images_per_epoch": summary["history"][-1]["train/images"],
            "wall_s": wall,
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "peak_tree_pss_mib": memory.peak_total / 2**20,
            "peak_process_rss_mib": memory.peak_single / 2**20,
        }
        results.setdefault(name, []).append(r)
        print(f"{name} [run {len(results[name])}]: {by_epoch[0]:.1f} images/s heads only, {by_epoch[-1]:.1f} whole "
              f"network; wall {wall:.0f} s; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; peak memory "
              f"{r['peak_tree_pss_mib']:.0f} MiB PSS process tree, {r['peak_process_rss_mib']:.0f} MiB RSS biggest "
              "process", flush=True)

    def on_ray(cfg):
        # Ray runs only while (b) does, so its idle processes never slow (a) or (c) down.
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            return train_ray(cfg, RayOptions(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", log_model=False),
                             resume=False)
        finally:
            ray.shutdown()

    cfg = load_config(args.config, overrides=overrides)
    print(f"{cfg.data.dataset}, {cfg.model.backbone} at {cfg.data.image_size} px, batch {cfg.train.batch_size}, "
          f"precision {cfg.train.precision}, {args.steps} steps per epoch; machine: {os.cpu_count()} CPUs", flush=True)
    A, B, C = "(a) local loop", "(b) Ray Data -> Ray Train", "(c) plain PyTorch loop"
    contenders = {
        "a": (A, lambda cfg: train_local(cfg, progress=False, resume=False), "local"),
        "b": (B, on_ray, "ray"),
        "c": (C, lambda cfg: plain_loop(cfg, steps=args.steps, epochs=2, threads=args.threads,
                                        loader_workers=args.loader_workers), "plain"),
    }
    overrides.append(f"train.threads={args.threads}")  # (a) only: (b) sizes itself, (c) takes it directly
    for _ in range(args.repeats):  # alternated, so load from elsewhere hits all alike
        for key in args.only:
            name, fn, out = contenders[key]
            if key == "b":
                overrides.remove(f"train.threads={args.threads}")
            run(name, fn, out)
            if key == "b":
                overrides.append(f"train.threads={args.threads}")

    best = {name: max(runs, key=lambda r: r["images_per_s"]) for name, runs in results.items()}
    summary = {}
    for top, bottom, label in ((B, A, "(b)/(a)"), (A, C, "(a)/(c)")):
        if top in best and bottom in best:
            ratio = best[top]["images_per_s"] / best[bottom]["images_per_s"]
            warm = best[top]["images_per_s_heads_only"] / best[bottom]["images_per_s_heads_only"]
            summary[label] = {"whole_network": ratio, "heads_only": warm}
            print(f"ratio {label} = {ratio:.3f} whole network, {warm:.3f} heads only (target >= 0.95): "
                  f"{'OK' if ratio >= 0.95 else 'BELOW TARGET'}")
    results["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
