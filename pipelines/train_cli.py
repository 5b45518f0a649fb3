"""``idml train`` (local or ``--ray``) and ``idml eval``: their arguments and what they run
(``idml.training.local``, ``pipelines.train``, ``idml.training.evaluate``). One module for both:
they read the same config arguments and print the same metrics table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idml.errors import InputError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, e.g. configs/emoji.yaml (the main job); without it idml.config's defaults (a fast 64 px IDML on the built-in emoji set)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="override config values, e.g. --set train.epochs=3 loss.name=triplet (may be repeated)")
    p.add_argument("--output-dir", help="where checkpoints, metrics and plots go (shortcut for --set output_dir=...)")



def add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if output_dir has last.pt (with --ray: a new run name with a timestamp)")
    track = p.add_argument_group("MLflow (every run logs its selected checkpoint as the model runs:/<run id>/model)")
    track.add_argument("--experiment", default="idml", help="MLflow experiment (default: idml)")
    track.add_argument("--register-model", metavar="NAME",
                       help="also register the model as a new version of NAME (then: idml model alias NAME champion N)")
    track.add_argument("--no-mlflow", action="store_true", help="local runs only: log nothing to MLflow")
    ray = p.add_argument_group("distributed training on Ray (pipelines.train)")
    ray.add_argument("--ray", action="store_true", help="train with Ray Data + Ray Train DDP workers, tracked in MLflow")
    ray.add_argument("--num-workers", type=int, default=1, help="DDP workers (default: 1)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs each worker reserves; leave some for Ray Data's decoding (default: 1)")
    ray.add_argument("--threads", type=int, default=0,
                     help="torch threads per worker (default: train.threads if set, else the node's CPUs shared "
                          "among its workers; decoding borrows what training leaves idle)")
    ray.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    ray.add_argument("--run-name", help="Ray run and MLflow run name; the same name resumes (default: the output folder's name)")
    ray.add_argument("--storage-path", help="Ray checkpoints; shared storage (NFS, s3://...) on a multi-node cluster "
                                            "(default: <output_dir>/ray)")
    ray.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint (default: 2)")
    ray.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")


def add_eval_args(ev: argparse.ArgumentParser) -> None:
    _add_config_args(ev)
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by idml train (best.pt, last.pt), a path on shared "
                                             "storage (s3://...), or an MLflow model: models:/NAME@alias, runs:/<run id>/model")
    source.add_argument("--frozen-backbone", action="store_true", help="evaluate the pretrained backbone's pooled features")
    ev.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    ev.add_argument("--json", help="write the metrics here")


def _load(args):
    from idml.config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    from idml.evaluation import format_metrics_table
    from idml.evaluation.protocol import describe_selective
    from idml.training.loop import FIGURES

    cfg = _load(args)
    if args.ray:
        from .train import RayOptions, plan, train_planned, where_stopped

        options = RayOptions(num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker, threads=args.threads,
                             use_gpu=args.gpu,
                             run_name=args.run_name, storage_path=args.storage_path, max_failures=args.max_failures,
                             experiment=args.experiment, register_model=args.register_model, address=args.address,
                             verbose=args.verbose)
        if args.no_mlflow:
            raise InputError("--no-mlflow applies to local runs: a Ray run is tracked in MLflow (the workers log to it)")
        p = plan(cfg, options, resume=not args.no_resume)
        args.where_stopped = lambda: where_stopped(p)
        summary = train_planned(p)
    else:
        import time

        from idml.checkpoint import describe_last_checkpoint
        from idml.training.local import track_local_run, train_local

        # Without resuming, a last.pt older than this command is the earlier run's.
        since = time.time() if args.no_resume else None
        args.where_stopped = lambda: describe_last_checkpoint(Path(cfg.output_dir) / "last.pt", since=since)
        if args.no_mlflow and args.register_model:
            raise InputError("--register-model needs MLflow; drop --no-mlflow")
        if not args.no_mlflow:
            from idml.tracking import check_tracking_store, tracking_uri

            check_tracking_store(tracking_uri(), hint=", or pass --no-mlflow")
        summary = train_local(cfg, resume=not args.no_resume)
        if not args.no_mlflow:
            summary.update(track_local_run(cfg, summary, experiment=args.experiment, register_model=args.register_model))
    print()
    print(format_metrics_table({f"test (epoch {summary['selected_epoch']})": summary["test"]}, _table_metrics(cfg, summary["test"])))
    _print_cross_domain(summary.get("cross_domain"))
    if describe_selective(summary):
        print("\n" + describe_selective(summary))
    print(f"\ntrain throughput: {summary['train_images_per_s']:.1f} images/s; "
          f"eval throughput: {summary['test']['embed_images_per_s']:.1f} images/s; "
          f"final evaluation (confidence, test, analyses, figures): {summary['final_evaluation_s']:.0f} s")
    # With --ray and validation, last.pt lives in Ray's checkpoint only: name what is there.
    written = [n for n in ("best.pt", "last.pt", "metrics.json", *FIGURES) if (Path(cfg.output_dir) / n).exists()]
    print(f"outputs in {cfg.output_dir}: {', '.join(written)}")
    if args.ray:
        print(f"Ray run {summary['run_name']!r} (checkpoints in {summary['storage_path']}); "
              f"MLflow run {summary['mlflow_run_id']}")
        summary.update(model_uri=f"runs:/{summary['mlflow_run_id']}/model")
    if summary.get("model_uri"):
        registered = (f"; registered as models:/{args.register_model}" + (f"/{summary['version']}" if summary.get("version") else "")
                      if args.register_model else "")
        print(f"MLflow model: {summary['model_uri']}{registered}")
    return 0



def run_eval(args: argparse.Namespace) -> int:
    from idml.training.evaluate import EvaluateRequest, evaluate_checkpoint
    from idml.evaluation import format_metrics_table
    from idml.evaluation.protocol import describe_selective

    cfg = _load(args)
    done = evaluate_checkpoint(EvaluateRequest(cfg, checkpoint=args.checkpoint, split=args.split))
    print(format_metrics_table({f"{done.name} / {done.split}": done.metrics}, _table_metrics(cfg, done.metrics)))
    _print_cross_domain(done.result["cross_domain"])
    if describe_selective(done.result):
        print("\n" + describe_selective(done.result))
    print(f"\neval throughput: {done.metrics['embed_images_per_s']:.1f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(done.report(), indent=2, default=float))
    return 0


def _table_metrics(cfg, metrics: dict) -> list[str]:
    wanted = [f"recall@{k}" for k in cfg.eval.recall_ks] + ["map@r", "r_precision", "nmi",
              "xdomain_recall@1", "recall_at_1_lowest_uncertainty", "recall_at_1_highest_uncertainty",
              "uncertainty_auroc_mixed"]
    return [m for m in wanted if m in metrics]


def _print_cross_domain(cross: dict | None) -> None:
    if not cross:
        return
    from idml.evaluation import format_metrics_table

    rows = {pair: {k: v for k, v in m.items() if k in ("recall@1", "map@r")} for pair, m in cross["pairs"].items()}
    rows["average"] = {k: v for k, v in cross["average"].items() if k in ("recall@1", "map@r")}
    print("\ncross-domain retrieval (query domain -> gallery domain):")
    print(format_metrics_table(rows))

