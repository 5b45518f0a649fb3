"""The training input pipeline alone, no model: Ray Data (read -> pack -> decode -> augment ->
batches, as ``idml train --ray`` streams them) against a torch DataLoader (``MPerClassSampler``
+ ``ImageShardDataset``, as ``idml train`` loads them) on the same CPUs.

    .venv/bin/python benchmarks/input_pipeline.py [--cpus 1,2 --sizes 128,224 --batches 40]

This is the number that says whether an accelerator will be fed: a training step on a GPU takes
milliseconds, so the input pipeline alone must deliver more images/s than the model consumes.

Each measurement runs in a fresh process pinned to ``--cpus`` CPUs (``sched_setaffinity``; Ray's
processes and DataLoader workers inherit the mask, so neither can use more), Ray started inside
it with that many CPUs and the DataLoader with that many workers. Both deliver class-balanced
batches of the main job's shape (64 images, 16 classes x 4) as uint8 NCHW tensors. Printed per
CPU count and image size: batches/s and images/s in steady state (after ``--warmup`` batches)
and from the first request (start-up included), Ray Data / DataLoader, and the 2-CPU / 1-CPU
scaling of each. Targets: Ray Data >= 0.9x the DataLoader, 2 CPUs >= 1.8x one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(kind: str, cpus: int, size: int, batches: int, warmup: int, dataset: str) -> dict:
    """One measurement, in this (already pinned) process."""
    from idml.config import load_config

    cfg = load_config(overrides=[f"data.dataset={dataset}", f"data.image_size={size}", "train.batch_size=64",
                                 "train.images_per_class=4"])
    started = time.perf_counter()
    if kind == "ray":
        import ray

        from idml.data.builtin import resolve_dataset
        from idml.data.source import open_dataset
        from pipelines._data import train_dataset
        from pipelines._worker_data import iter_train_batches

        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        source = open_dataset(resolve_dataset(cfg.data.dataset))
        stream = iter_train_batches(train_dataset(source, cfg).iterator(), size, [])
    else:
        import torch

        from idml.data import ImageShardDataset, resolve_dataset
        from idml.training.local import class_balanced_loader
        from idml.transforms import train_transform

        torch.set_num_threads(1)
        cfg.data.workers = cpus
        root = resolve_dataset(cfg.data.dataset)  # a built-in name or a folder
        stream = iter(class_balanced_loader(ImageShardDataset(root, "train", transform=train_transform(size)), cfg))
    times, images = [], 0
    for i, (x, y) in enumerate(stream):
        times.append(time.perf_counter())
        if i >= warmup:
            images += len(y)
        if i + 1 >= warmup + batches:
            break
    if len(times) < warmup + batches:
        raise SystemExit(f"the training split gave only {len(times)} batches; lower --batches or --warmup")
    steady = times[-1] - times[warmup - 1]
    return {"kind": kind, "cpus": cpus, "size": size, "batches": batches,
            "steady_batches_per_s": batches / steady, "steady_images_per_s": images / steady,
            "first_batch_s": times[0] - started, "end_to_end_images_per_s": (warmup + batches) * 64 / (times[-1] - started)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--cpus", default="1,2", help="CPU counts to pin to, e.g. 1,2 or 8,16")
    parser.add_argument("--sizes", default="128,224", help="image sizes")
    parser.add_argument("--batches", type=int, default=40, help="batches measured (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # kind,cpus,size: run one measurement here
    args = parser.parse_args(argv)
    if args.one:
        kind, cpus, size = args.one.split(",")
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: int(cpus)]))
        print(json.dumps(measure(kind, int(cpus), int(size), args.batches, args.warmup, args.dataset)))
        return 0
    available = len(os.sched_getaffinity(0))
    results = []
    for size in map(int, args.sizes.split(",")):
        for cpus in map(int, args.cpus.split(",")):
            if cpus > available:
                print(f"skipping {cpus} CPUs: this machine has {available}")
                continue
            for kind in ("dataloader", "ray"):  # fresh processes, one at a time
                out = subprocess.run([sys.executable, __file__, "--one", f"{kind},{cpus},{size}", "--dataset", args.dataset,
                                      "--batches", str(args.batches), "--warmup", str(args.warmup)],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(r)
                print(f"{size} px, {cpus} CPU(s), {kind:10s}: {r['steady_images_per_s']:7.1f} images/s steady "
                      f"({r['steady_batches_per_s']:.2f} batches/s), first batch after {r['first_batch_s']:.1f} s, "
                      f"{r['end_to_end_images_per_s']:.1f} images/s from the first request", flush=True)
    by = {(r["kind"], r["cpus"], r["size"]): r["steady_images_per_s"] for r in results}
    summary = {}
    for size in map(int, args.sizes.split(",")):
        for cpus in map(int, args.cpus.split(",")):
            if ("ray", cpus, size) in by:
                ratio = by[("ray", cpus, size)] / by[("dataloader", cpus, size)]
                summary[f"ray_over_dataloader_{cpus}cpu_{size}px"] = ratio
                print(f"{size} px, {cpus} CPU(s): Ray Data / DataLoader = {ratio:.2f} (target >= 0.9)")
        counts = sorted(map(int, args.cpus.split(",")))
        for kind in ("ray", "dataloader"):
            if len(counts) > 1 and (kind, counts[-1], size) in by and (kind, counts[0], size) in by:
                scaling = by[(kind, counts[-1], size)] / by[(kind, counts[0], size)]
                summary[f"{kind}_scaling_{counts[0]}_to_{counts[-1]}cpu_{size}px"] = scaling
                print(f"{size} px, {kind}: {counts[-1]} CPUs / {counts[0]} = {scaling:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
