"""The end of a search: the sorted trial table, the best config (a YAML ``idml train`` takes
unchanged), the objective against each searched parameter, MLflow children closed, and the optional
retraining of the best and the lambda = 0 config on several seeds (evaluated once on test)."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from idml.losses import loss_defaults
from idml.tracking import MlflowRun, metric_name

from ._tune_space import LAMBDA

MARGIN = "loss.margin"

log = logging.getLogger(__name__)


def trial_rows(search, grid) -> list[dict[str, Any]]:
    """One row per trial, sorted best first: status, epochs run, parameters, best objective."""
    key, r1 = metric_name(search.space.objective), metric_name("val/recall@1")
    rows = []
    for result in grid:
        index = result.config["trial"]["index"]
        cfg = search.trial_config(index)
        df = result.metrics_dataframe
        epochs = 0 if df is None or "epoch" not in df else int(df["epoch"].max()) + 1
        best = None
        if df is not None and key in df and df[key].notna().any():
            best = df.loc[df[key].idxmax() if search.space.mode == "max" else df[key].idxmin()]
        status = "error" if result.error else ("stopped early" if epochs < cfg.train.epochs else "completed")
        margin = cfg.loss.margin if cfg.loss.margin is not None else loss_defaults(cfg.loss.name)["margin"]
        rows.append({"trial": index, "status": status, "epochs": epochs, "lambda": cfg.loss.uncertainty_weight,
                     "margin": margin, **{k: v for k, v in result.config["trial"]["params"].items() if k not in (LAMBDA, MARGIN)},
                     "objective": None if best is None else float(best[key]),
                     "val/recall@1": None if best is None or r1 not in best else float(best[r1]),
                     "best_epoch": None if best is None else int(best["epoch"])})
    sign = -1 if search.space.mode == "max" else 1
    return sorted(rows, key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0.0), r["trial"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# The table's names for the two knobs of the introspective metric; other keys keep their own.
ROW_NAMES = {LAMBDA: "lambda", MARGIN: "margin"}
PLOT_NAME = "objective_vs_params.png"


def save_plot(rows: list[dict[str, Any]], objective: str, searched: list[str], path: Path) -> Path:
    """The objective against each searched parameter, one point per trial; early-stopped ones as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(searched), figsize=(5 * len(searched), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, key in zip(axes, searched):
        param = ROW_NAMES.get(key, key)
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            points = [(r[param], r["objective"]) for r in rows if r["status"] == status
                      and r["objective"] is not None and r.get(param) is not None]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=status)
        ax.set_xlabel(f"{param} ({key})" if param != key else key)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{objective} (best epoch)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish_search(search, grid, parent: MlflowRun) -> dict[str, Any]:
    """Table, best config and plot, printed and written under the search's folder and logged to
    the parent run; child runs of stopped trials are closed."""
    rows = trial_rows(search, grid)
    scored = [r for r in rows if r["objective"] is not None]
    if not scored:
        raise RuntimeError(f"no trial of search {search.name!r} reported {search.space.objective}; see the errors above")
    best, baseline = scored[0], next((r for r in rows if r["trial"] == 0), None)
    cfg = search.space.trial_config(search.space.trials[best["trial"]])
    cfg.output_dir = f"runs/{search.name}-best"
    out = search.out
    (out / "best_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    table = format_table(rows)
    (out / "trials.txt").write_text(table + "\n")
    save_plot(rows, search.space.objective, list(search.space.params), out / PLOT_NAME)
    print(f"\nsearch {search.name!r}: {len(rows)} trials, sorted by {search.space.objective} "
          "(trial 0: lambda = 0, the base config's other values)\n")
    print(table)
    if baseline is not None and baseline["objective"] is not None:
        print(f"\nbest: trial {best['trial']} ({search.space.objective} {best['objective']:.4f}) vs lambda = 0: "
              f"{baseline['objective']:.4f}")
    print(f"outputs in {out}: best_config.yaml (idml train --config ...), trials.txt, {PLOT_NAME}")
    _close_children(search, parent, rows)
    parent.log_metrics({"best_objective": best["objective"], "best_trial": best["trial"],
                        **({"lambda0_objective": baseline["objective"]} if baseline and baseline["objective"] is not None else {})})
    parent.client.set_tag(parent.run_id, "idml.best_trial", str(best["trial"]))
    for name in ("best_config.yaml", "trials.txt", PLOT_NAME, "trials.json"):
        parent.log_artifact(out / name)
    parent.log_artifact(search.space.path, "space")
    return {"name": search.name, "objective": search.space.objective, "rows": rows, "best_trial": best["trial"],
            "best_config": str(out / "best_config.yaml"), "parent_run_id": parent.run_id}


def _close_children(search, parent: MlflowRun, rows: list[dict[str, Any]]) -> None:
    """The trial table decides each child run's final status: ASHA stops a trial by ending its
    process, which leaves its run RUNNING, or FAILED where the trainable saw the stop as an
    exception; a driver killed mid-search leaves the same behind for trials that later finished."""
    client = parent.client
    children = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    status = {r["trial"]: r["status"] for r in rows}
    for child in children:
        trial = int(child.data.tags.get("idml.trial", -1))
        client.set_tag(child.info.run_id, "idml.status", status.get(trial, "unknown"))
        final = "FAILED" if status.get(trial) == "error" else "FINISHED"
        if child.info.status != final:
            client.set_terminated(child.info.run_id, final)


def retrain(search, summary: dict[str, Any], parent: MlflowRun) -> dict[str, Any]:
    """The best and the lambda = 0 config trained on ``retrain_seeds`` seeds with the full
    ``idml train --ray`` job, each evaluated once on the test split: mean and spread."""
    from .train import train_ray

    out: dict[str, Any] = {}
    for label, index in (("best", summary["best_trial"]), ("lambda0", 0)):
        if label == "lambda0" and index == summary["best_trial"]:
            out[label] = out["best"]  # lambda = 0 won the search: the same runs answer both
            continue
        scores = []
        for seed in range(search.options.retrain_seeds):
            cfg = search.space.trial_config(search.space.trials[index])
            cfg.train.seed = seed
            cfg.output_dir = str(search.out / "retrain" / f"{label}-seed{seed}")
            name = f"{search.name}-{label}-seed{seed}"
            result = train_ray(cfg, search.ray_options(name, f"{search.storage}/{search.name}-retrain"))
            parent.client.set_tag(result["mlflow_run_id"], "mlflow.parentRunId", parent.run_id)
            parent.client.set_tag(result["mlflow_run_id"], "idml.retrain", f"{label}-seed{seed}")
            scores.append({"seed": seed, "recall@1": result["test"]["recall@1"], "map@r": result["test"]["map@r"]})
        out[label] = {"trial": index, "seeds": scores,
                      **{f"{m}_{stat}": fn([s[m] for s in scores]) for m in ("recall@1", "map@r")
                         for stat, fn in (("mean", statistics.fmean), ("std", _std))}}
    print(f"\nretrained on {search.options.retrain_seeds} seed(s), test split (mean +- std):")
    for label, r in out.items():
        print(f"  {label:8s} (trial {r['trial']}): R@1 {100 * r['recall@1_mean']:.2f} +- {100 * r['recall@1_std']:.2f}, "
              f"MAP@R {100 * r['map@r_mean']:.2f} +- {100 * r['map@r_std']:.2f}")
    parent.log_metrics({f"retrain/{label}/{k}": v for label, r in out.items() for k, v in r.items()
                        if isinstance(v, float) and math.isfinite(v)})
    return out


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
