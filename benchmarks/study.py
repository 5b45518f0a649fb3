"""The quality study: does IDML help, and does its uncertainty mean anything?

    .venv/bin/python benchmarks/study.py [--groups ablation,lambda,lambda_mixup,losses] [--seeds 3] [--parallel 2]
                                         [--config configs/emoji.yaml] [--set key=value ...]

Trains every variant of the chosen groups on the same config and budget, ``--seeds`` seeds each
(one for the base losses other than MultiSimilarity, Contrastive and FastAP unless ``--loss-seeds``), ``--parallel`` runs at a
time with ``cores / parallel`` torch threads each (two 1-thread runs use 2 cores better than one
2-thread run). Each run is the plain ``idml train`` command in its own folder under ``--out``
with its log; a run whose ``metrics.json`` exists is not trained again, so an interrupted study
resumes where it stopped. Then it writes mean +- spread tables to ``--results`` (Markdown),
the same numbers to ``<out>/study.json``, and one MLflow run (experiment ``idml-study``) with the
tables and the per-variant means as metrics.

Groups:
  ablation      ProxyAnchor; + mixup only; + introspective metric only; full IDML; the released
                code's variant (uncertainty embedding normalised per image, so constant). This
                group and both lambda groups train ProxyAnchor whatever the config's loss.
  lambda        the introspective metric without mixup (the default's IDML) at each --lambdas
                value (0 is plain ProxyAnchor).
  lambda_mixup  full IDML (metric + mixup) at each --lambdas value (0 is ProxyAnchor + mixup).
  losses        every base loss but ProxyAnchor (the ablation's), plain vs the introspective metric
                without mixup (on ProxyAnchor, mixup cost retrieval and doubled the compute).
  failure_losses  the failure predictor (the default's uncertainty) on every base loss but the
                config's own (the uncertainty group's): its embedding is the plain base loss's, so
                what this measures is whether the uncertainty orders queries on every loss.
  uncertainty   how the uncertainty is learned, on the config's base loss (model.uncertainty):
                IDML's introspective metric; a PFE head (mutual likelihood on positive pairs);
                a failure predictor (wrong top-1 neighbour); the released code's constant
                uncertainty as the floor. PFE and the failure predictor read a stop-gradient
                copy of the features, so the base loss trains the embedding alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IDML = Path(sys.executable).parent / "idml"

# Every variant names how its uncertainty is learned, whatever the config's default: the
# IDML variants learn it through the metric, the plain ones keep an untrained head as before.
PLAIN = {"loss.introspective": False, "loss.mixup": False, "model.uncertainty": "metric"}
IDML_FULL = {"loss.introspective": True, "loss.mixup": True, "model.uncertainty": "metric"}
METRIC_ONLY = {"loss.introspective": True, "loss.mixup": False, "model.uncertainty": "metric"}
# The ablation and the lambda sweeps are the paper's IDML-ProxyAnchor, whatever the config's loss.
PROXY_ANCHOR = {"loss.name": "proxy_anchor"}
GROUPS = ("ablation", "lambda", "lambda_mixup", "losses", "uncertainty", "failure_losses")
UNCERTAINTY_VARIANTS = (
    ("metric", METRIC_ONLY, "introspective metric (IDML), lambda 0.1"),
    ("pfe", {**PLAIN, "model.uncertainty": "pfe"}, "PFE head (stop-gradient, mutual likelihood)"),
    ("failure", {**PLAIN, "model.uncertainty": "failure"}, "failure predictor (stop-gradient)"),
    ("constant", {**METRIC_ONLY, "model.uncertainty_norm": "unit"}, "released code's constant uncertainty"),
)
OTHER_LOSSES = ("proxy_nca", "multi_similarity", "contrastive", "triplet", "margin", "fastap")
# The issue asks 3 seeds of these two; FastAP joined them as the best base loss at this budget.
FULL_SEED_LOSSES = ("multi_similarity", "contrastive", "fastap")

BEGIN, END = "<!-- study tables: begin (written by benchmarks/study.py) -->", "<!-- study tables: end -->"

# (column title, key in metrics.json "test", scale)
COLUMNS = [
    ("R@1", "recall@1", 100), ("R@2", "recall@2", 100), ("R@4", "recall@4", 100), ("MAP@R", "map@r", 100),
    ("RP", "r_precision", 100), ("NMI", "nmi", 100), ("x-vendor R@1", "xdomain_recall@1", 100),
]
UNCERTAINTY_COLUMNS = [
    ("mixed AUROC", "uncertainty_auroc_mixed", 1), ("blend Spearman", "uncertainty_blend_spearman", 1),
    ("R@1 low-u Q1", "recall_at_1_lowest_uncertainty", 100), ("R@1 high-u Q4", "recall_at_1_highest_uncertainty", 100),
    ("AURC uncertainty", "aurc_uncertainty", 1), ("AURC top-1 sim", "aurc_top1_similarity", 1),
    ("AURC top-1 gap", "aurc_top1_gap", 1), ("AURC confidence", "aurc_confidence", 1), ("AURC oracle", "aurc_oracle", 1),
    ("R-AUROC uncertainty", "r_auroc_uncertainty", 1), ("R-AUROC gap", "r_auroc_top1_gap", 1),
    ("R-AUROC confidence", "r_auroc_confidence", 1), ("ECE confidence", "confidence_ece", 1),
]


@dataclass
class Variant:
    name: str
    group: str
    overrides: dict
    seeds: int
    description: str = ""
    runs: list = field(default_factory=list)


def variants(groups: list[str], seeds: int, loss_seeds: int, lambdas: list[float]) -> list[Variant]:
    out = []
    if "ablation" in groups:
        ablation = [
            Variant("proxy_anchor", "ablation", PLAIN, seeds, "ProxyAnchor"),
            Variant("mixup_only", "ablation", {**PLAIN, "loss.mixup": True}, seeds,
                    "ProxyAnchor + mixup"),
            Variant("metric_only", "ablation", METRIC_ONLY, seeds,
                    "ProxyAnchor + introspective metric"),
            Variant("idml", "ablation", IDML_FULL, seeds, "IDML (metric + mixup)"),
            Variant("released", "ablation", {**IDML_FULL, "model.uncertainty_norm": "unit"}, seeds,
                    "IDML as released (sigma normalised: constant uncertainty)"),
        ]
        out += [Variant(v.name, v.group, {**PROXY_ANCHOR, **v.overrides}, v.seeds, v.description) for v in ablation]
    if "lambda" in groups:
        out += [Variant(f"metric_lambda{lam:g}", "lambda", {**PROXY_ANCHOR, **METRIC_ONLY, "loss.uncertainty_weight": lam}, seeds,
                        f"introspective metric, lambda = {lam:g}") for lam in lambdas]
    if "lambda_mixup" in groups:
        out += [Variant(f"idml_lambda{lam:g}", "lambda_mixup", {**PROXY_ANCHOR, **IDML_FULL, "loss.uncertainty_weight": lam},
                        seeds, f"IDML (metric + mixup), lambda = {lam:g}") for lam in lambdas]
    if "losses" in groups:
        for loss in OTHER_LOSSES:
            n = seeds if loss in FULL_SEED_LOSSES else loss_seeds
            out += [Variant(f"{loss}", "losses", {**PLAIN, "loss.name": loss}, n, f"{loss}"),
                    Variant(f"{loss}_idml", "losses", {**METRIC_ONLY, "loss.name": loss}, n, f"IDML-{loss}")]
    if "failure_losses" in groups:
        for loss in ("proxy_anchor", *OTHER_LOSSES[:-1]):
            n = seeds if loss in FULL_SEED_LOSSES else loss_seeds
            out.append(Variant(f"{loss}_failure", "failure_losses", {**PLAIN, "model.uncertainty": "failure",
                                                                      "loss.name": loss}, n, f"{loss} + failure predictor"))
    if "uncertainty" in groups:
        out += [Variant(f"uncertainty_{name}", "uncertainty", overrides, seeds, description)
                for name, overrides, description in UNCERTAINTY_VARIANTS]
    return out


def run_dir(out: Path, variant: Variant, seed: int) -> Path:
    return out / f"{variant.name}-seed{seed}"


def command(config: str, extra: list[str], variant: Variant, seed: int, folder: Path, threads: int) -> list[str]:
    sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in variant.overrides.items()]
    sets += [*extra, f"train.seed={seed}", f"train.threads={threads}", f"output_dir={folder}"]
    return [str(IDML), "train", "--config", config, "--no-resume", "--set", *sets]


def run_all(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    pending, active = list(jobs), []
    while pending or active:
        while pending and len(active) < parallel:
            cmd, folder = pending.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "w")
            log.write(" ".join(cmd) + "\n")
            log.flush()
            print(f"[study] start {folder.name}", flush=True)
            active.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), folder, log,
                           time.time()))
        time.sleep(5)
        for item in list(active):
            proc, folder, log, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            wall = time.time() - started
            if proc.returncode == 0:
                (folder / "wall_s.txt").write_text(f"{wall:.1f}\n")
                print(f"[study] done  {folder.name} in {wall / 60:.1f} min", flush=True)
            else:
                print(f"[study] FAILED {folder.name} (exit {proc.returncode}); see {folder / 'train.log'}", flush=True)


def reevaluate(folder: Path) -> None:
    """The end of a finished run again, with this code: the confidence's fit on validation and
    the test evaluation of its best.pt (``idml.training.loop.evaluate_and_summarize``, as training ends);
    the training and its history are the run's."""
    sys.path.insert(0, str(ROOT))
    from idml.checkpoint import checkpoint_config, load_checkpoint
    from idml.data import ImageShardDataset, resolve_dataset
    from idml.training.setup import configure_threads
    from idml.training.loop import evaluate_and_summarize
    from idml.transforms import eval_transform

    summary = json.loads((folder / "metrics.json").read_text())
    cfg = checkpoint_config(load_checkpoint(folder / "best.pt"))
    cfg.output_dir = str(folder)
    configure_threads(cfg.train.threads)
    root = resolve_dataset(cfg.data.dataset)
    split = lambda name: ImageShardDataset(root, name, transform=eval_transform(cfg.data.image_size))  # noqa: E731
    evaluate_and_summarize(cfg, folder / "best.pt", split(cfg.data.test_split), summary["history"], progress=False,
                           val_ds=split(cfg.data.val_split), distractors=split(cfg.data.train_split))
    print(f"[study] re-evaluated {folder.name}", flush=True)


def collect(variant: Variant, out: Path, seeds: int) -> None:
    for seed in range(seeds):
        folder = run_dir(out, variant, seed)
        metrics = folder / "metrics.json"
        if metrics.exists():
            summary = json.loads(metrics.read_text())
            wall = folder / "wall_s.txt"
            summary["wall_s"] = float(wall.read_text()) if wall.exists() else float("nan")
            variant.runs.append(summary)


def mean_spread(values: list[float], scale: float) -> str:
    values = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}" if scale == 1 else f"{values[0]:.1f}"
    fmt = ".3f" if scale == 1 else ".1f"
    return f"{np.mean(values):{fmt}} ± {np.std(values, ddof=1):{fmt}}"


def table(variants_: list[Variant], columns, *, wall: bool) -> str:
    head = ["variant", "seeds", *[c[0] for c in columns]] + (["train wall (min)"] if wall else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants_:
        if not v.runs:
            continue
        cells = [v.description, str(len(v.runs))]
        cells += [mean_spread([r["test"].get(key) for r in v.runs], scale) for _, key, scale in columns]
        if wall:
            cells.append(f"{np.mean([r['wall_s'] for r in v.runs]) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: Path, variants_: list[Variant], header: str) -> str:
    groups = {}
    for v in variants_:
        groups.setdefault(v.group, []).append(v)
    parts = [header]
    for group, members in groups.items():
        parts += [f"\n### {group}\n", "Retrieval (test split, %; mean ± sample std over seeds):\n",
                  table(members, COLUMNS, wall=True)]
        with_u = [v for v in members if any("aurc_uncertainty" in r["test"] for r in v.runs)]
        if with_u:
            parts += ["\nUncertainty (see docs/results.md for what each column means):\n",
                      table(with_u, UNCERTAINTY_COLUMNS, wall=False)]
    text = "\n".join(parts) + "\n"
    # The tables go between markers, so the narrative around them in the same file survives a rerun.
    block = f"{BEGIN}\n{text}{END}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = path.read_text() if path.exists() else ""
    if BEGIN in current and END in current:
        before, rest = current.split(BEGIN, 1)
        block = before + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        block = current + ("\n" if current else "") + block
    path.write_text(block)
    return text


def log_to_mlflow(out: Path, variants_: list[Variant], results: Path, args) -> None:
    sys.path.insert(0, str(ROOT))
    from idml.tracking import MlflowRun, tracking_uri

    run = MlflowRun.open(tracking_uri(ROOT), "idml-study", out.name)
    run.log_params({"config": args.config, "groups": args.groups, "seeds": args.seeds, "set": " ".join(args.set)})
    for v in variants_:
        for _, key, scale in COLUMNS + UNCERTAINTY_COLUMNS:
            values = [r["test"][key] for r in v.runs if key in r["test"]]
            if values:
                run.log_metrics({f"{v.name}/{key}": float(np.mean(values))})
    run.log_artifact(results)
    run.log_artifact(out / "study.json")
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/emoji.yaml", help="base config every variant starts from")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every variant (e.g. the budget: train.epochs=6)")
    parser.add_argument("--groups", default="ablation", help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    parser.add_argument("--loss-seeds", type=int, default=1,
                        help="seeds for the base losses other than MultiSimilarity, Contrastive and FastAP")
    parser.add_argument("--lambdas", default="0,0.03,0.1,0.3,1", help="uncertainty weights of the lambda group")
    parser.add_argument("--variants", default="", help="comma-separated variant names of the chosen groups to run, "
                        "in this order (default: all)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (default: cores / --parallel; 1 where other runs share the cores)")
    parser.add_argument("--out", default="runs/study", help="folder of the runs")
    parser.add_argument("--results", default="docs/results.md", help="Markdown file the tables go to")
    parser.add_argument("--no-train", action="store_true", help="only collect finished runs and write the tables")
    parser.add_argument("--reevaluate", action="store_true",
                        help="first redo the end of every finished run (confidence fit, test evaluation) with this code")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow run")
    args = parser.parse_args(argv)

    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown or args.seeds < 1 or args.parallel < 1:
        parser.error(f"bad --groups {sorted(unknown)} or --seeds/--parallel < 1" if unknown else "--seeds and --parallel must be >= 1")
    out = (ROOT / args.out).resolve()
    lambdas = [float(x) for x in args.lambdas.split(",")]
    chosen = variants(groups, args.seeds, args.loss_seeds, lambdas)
    if args.variants:
        by_name = {v.name: v for v in chosen}
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        if set(names) - set(by_name):
            parser.error(f"unknown --variants {sorted(set(names) - set(by_name))}; the groups have {', '.join(by_name)}")
        chosen = [by_name[n] for n in names]
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.parallel)
    jobs = [(command(args.config, args.set, v, seed, run_dir(out, v, seed), threads), run_dir(out, v, seed))
            for v in chosen for seed in range(v.seeds) if not (run_dir(out, v, seed) / "metrics.json").exists()]
    print(f"[study] {len(chosen)} variants, {len(jobs)} runs to train, {args.parallel} at a time, {threads} threads each",
          flush=True)
    if not args.no_train:
        run_all(jobs, args.parallel)
    if args.reevaluate:
        for v in chosen:
            for seed in range(v.seeds):
                if (run_dir(out, v, seed) / "best.pt").exists():
                    reevaluate(run_dir(out, v, seed))
    for v in chosen:
        collect(v, out, v.seeds)
    (out / "study.json").write_text(json.dumps(
        {v.name: {"group": v.group, "overrides": v.overrides, "runs": [{"test": r["test"], "wall_s": r["wall_s"],
                                                                       "selected_epoch": r.get("selected_epoch")}
                                                                      for r in v.runs]} for v in chosen},
        indent=2, default=float))
    command_line = " ".join(["benchmarks/study.py", *(argv if argv is not None else sys.argv[1:])])
    header = (f"## Study: `{args.config}`" + (f" with `--set {' '.join(args.set)}`" if args.set else "") +
              f"\n\nCommand: `.venv/bin/python {command_line}`. Train wall time is each run's own, measured "
              f"with {args.parallel} runs side by side ({threads} torch thread(s) each) and whatever else the "
              "machine was doing: compare it within one table only.")
    results = ROOT / args.results
    print(write_results(results, chosen, header))
    if not args.no_mlflow:
        log_to_mlflow(out, chosen, results, args)
    missing = sum(v.seeds - len(v.runs) for v in chosen)
    if missing:
        print(f"[study] {missing} runs have no results yet (failed or not trained)", flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
