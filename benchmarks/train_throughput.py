"""Training throughput: the plain single-process loop vs the Ray Data -> Ray Train path.

    .venv/bin/python benchmarks/train_throughput.py [--classes 48 --per-class 16 --repeats 2 --json out.json]

Measures, in one run and on the same generated dataset, model, batch size and torch threads:

  (a) ``idml.train.train_local``: the local loop over a torch DataLoader (class-balanced
      sampler, ``--loader-workers`` decoding processes);
  (b) ``pipelines.train.train_ray`` with one worker of ``--threads`` CPUs: Ray Data packs,
      decodes and augments, Ray Train runs the same loop;
  (c) the same with two workers of ``--threads`` CPUs each (per-worker batch size, so twice
      the images per step; on a 2-core machine the workers then share the cores with Ray Data);

(a) and (b) run ``--repeats`` times, alternately, and the best run of each counts: on a shared
machine, load from elsewhere then hits both alike. Ray runs only during (b) and (c).

and prints, for each, images/s of every epoch (the training loop's own measure, data waits
included) and of the best epoch after the first (the first pays one-off start-up: processes,
imports, allocator warm-up; the best of the rest is the least disturbed by other load on the
machine), the ratio (b)/(a) (target >= 0.9) and (c)/(b), the load average around each run, and
peak memory: the proportional set size (PSS, shared pages split between the processes sharing
them) of each run's whole process tree (this process and its children: DataLoader workers, or
the entire local Ray instance) and the peak resident size of its biggest single process.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=48)
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (= CPUs) of the training process")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader decoding processes in (a)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating (a), (b) runs; the best of each counts")
    parser.add_argument("--skip-two-workers", action="store_true")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data logs every execution at INFO
    warnings.simplefilter("ignore", DeprecationWarning)

    import ray

    from idml.train import train_local
    from pipelines.train import RayOptions, train_ray

    work = Path(tempfile.mkdtemp(prefix="idml-train-bench-"))
    data = make_dataset(work / "data", args.classes, args.per_class, args.image_size)
    overrides = [
        f"data.dataset={data}", f"data.image_size={args.image_size}", f"data.workers={args.loader_workers}",
        f"model.backbone={args.backbone}", "model.pretrained=false", "model.embedding_dim=128",
        f"train.batch_size={args.batch_size}", "train.images_per_class=4", f"train.epochs={args.epochs}",
        "train.warmup_epochs=0", f"train.threads={args.threads}", f"train.eval_every={args.epochs}",
        "eval.nmi=false", "eval.batch_size=64",
    ]
    results: dict = {}

    def run(name, fn, out):
        cfg = load_config(overrides=overrides + [f"output_dir={work / out}"])
        load_before = os.getloadavg()[0]
        with MemorySampler() as memory:
            start = time.perf_counter()
            summary = fn(cfg)
            wall = time.perf_counter() - start
        by_epoch = [h["train/images_per_s"] for h in summary["history"]]
        r = {
            "images_per_s": max(by_epoch[1:] or by_epoch),
            "images_per_s_mean_after_first": float(np.mean(by_epoch[1:] or by_epoch)),
            "images_per_s_by_epoch": by_epoch,
            "images_per_epoch": summary["history"][-1]["train/images"],
            "wall_s": wall,
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "peak_tree_pss_mib": memory.peak_total / 2**20,
            "peak_process_rss_mib": memory.peak_single / 2**20,
        }
        results.setdefault(name, []).append(r)
        print(f"{name} [run {len(results[name])}]: {r['images_per_s']:.1f} images/s (by epoch: "
              f"{', '.join(f'{v:.1f}' for v in by_epoch)}); wall {wall:.0f} s; load average {load_before:.1f} -> "
              f"{os.getloadavg()[0]:.1f}; peak memory {r['peak_tree_pss_mib']:.0f} MiB PSS process tree, "
              f"{r['peak_process_rss_mib']:.0f} MiB RSS biggest process", flush=True)

    def on_ray(name, out, **options):
        # Ray runs only while (b)/(c) do, so its idle processes never slow (a) down.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            run(name, lambda cfg: train_ray(cfg, RayOptions(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", **options),
                                            resume=False), out)
        finally:
            ray.shutdown()

    print(f"dataset: {args.classes} classes x {args.per_class} images of {args.image_size}px; {args.backbone}, "
          f"batch {args.batch_size}, {args.threads} torch thread(s); machine: {os.cpu_count()} CPUs", flush=True)
    cpus = os.cpu_count() or 2
    A, B = "(a) local loop + DataLoader", "(b) Ray Data -> Ray Train, 1 worker"
    for _ in range(args.repeats):  # alternated, so load from elsewhere hits both alike
        run(A, lambda cfg: train_local(cfg, progress=False, resume=False), "local")
        on_ray(B, "ray1", num_workers=1, cpus_per_worker=args.threads)
    if not args.skip_two_workers:
        per_worker = min(float(args.threads), (cpus - 1) / 2)  # leave a CPU for Ray Data
        on_ray(f"(c) Ray Data -> Ray Train, 2 workers x {per_worker:g} CPU", "ray2", num_workers=2,
               cpus_per_worker=per_worker)

    best = {name: max(runs, key=lambda r: r["images_per_s"]) for name, runs in results.items()}
    a, b = best[A], best[B]
    ratio = b["images_per_s"] / a["images_per_s"]
    mean_ratio = (np.mean([r["images_per_s_mean_after_first"] for r in results[B]])
                  / np.mean([r["images_per_s_mean_after_first"] for r in results[A]]))
    print(f"ratio (b)/(a) = {ratio:.3f} (target >= 0.9): {'OK' if ratio >= 0.9 else 'BELOW TARGET'}; "
          f"on the means of all epochs after the first: {mean_ratio:.3f}")
    summary = {"ratio_b_over_a": ratio, "ratio_b_over_a_mean": float(mean_ratio)}
    two = [r for name, r in best.items() if name.startswith("(c)")]
    if two:
        summary["scaling_2_workers"] = two[0]["images_per_s"] / b["images_per_s"]
        print(f"2-worker scaling (c)/(b) = {summary['scaling_2_workers']:.2f}x (each worker takes a full batch per step)")
    results["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
