"""After the sweep: copy each D's best checkpoint into the seed's layout, one row a D', and summarise them
(json, csv, the plot and the table printed); the passes that score the rows further are `trm_ray.scoring`'s.

The numbers in `sweep_results.json` are read back from the exported checkpoint files
themselves (their `best_metrics`), so the summary can never disagree with what was saved.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from trm_ray.compressor import WEIGHT_KEY, load_checkpoint, orthonormality_error, read_checkpoint, save_checkpoint
from trm_ray.config import Config
from trm_ray.files import atomic_output, exists, filesystem, read_bytes, write_json
from trm_ray.pca import curve_points, pca_metrics
from trm_ray.references import eigenvectors
from trm_ray.scoring import PASSES
from trm_ray.tracking import tracking
from trm_ray.names import KL_METRICS, METRICS, PCA_REFERENCES, PHASE2_METRICS, width_key



def best_checkpoint_path(result: Any) -> str | None:
    """The trial's latest checkpoint, whose d<D'>/compressor.pt holds each D''s best weights.

    Train keeps one checkpoint and reports to Tune through a queue, so it runs ahead: when ASHA stops
    a trial on report k, Train may have registered k+1 and deleted k. Then the newest checkpoint
    beside k's is the trial's latest, and its compressors the best through k+1."""
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df or df["checkpoint_path"].isna().all():
        return None
    reported = df["checkpoint_path"].dropna().iloc[-1]
    fs, path = filesystem(reported)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return reported
    scheme = reported[:reported.index("://") + 3] if "://" in reported else ""
    beside = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(posixpath.dirname(path), allow_not_found=True))
                    if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"))
    return scheme + beside[-1] if beside else None


def reported(result: Any, key: str, which: int = -1) -> Any:
    """The first (which=0) or last value a trial reported under `key`, None if it never did."""
    df = result.metrics_dataframe
    if df is None or key not in df or df[key].isna().all():
        return None
    return df[key].dropna().iloc[which]


def exclusions(manifest: dict[str, Any]) -> str:
    """Which tokens the shards (so training, metrics and the PCA limit) leave out, in words."""
    parts = ["the first token of each sequence"] if manifest.get("exclude_first_token") else []
    if manifest.get("outlier_norm_factor"):
        parts.append(f"{manifest['outlier_tokens_dropped']:,} tokens with norm > {manifest['outlier_norm_factor']:g}x the median")
    return ", ".join(parts) or "nothing"


def export_results(grid: Any, cfg: Config, manifest: dict[str, Any], checkpoint_file: str,
                   limit: dict[str, Any]) -> list[dict[str, Any]]:
    """Export the best trial's checkpoint per D' and write the results (json, csv)."""
    d_model = manifest["hidden_size"]
    best: dict[int, dict[str, Any]] = {}
    errors: dict[int, list[str]] = {}  # trials that errored: the sweep failed
    unusable: dict[int, list[str]] = {}  # widths that ended with nothing to export (e.g. diverged at once)
    for result in grid:  # a trial per learning rate, each with every D'
        lr = float(result.config["learning_rate"])
        label = f"lr {lr:g}: " if cfg.sweep_learning_rates else ""
        src = best_checkpoint_path(result)
        for d in cfg.d_values:
            if result.error is not None:  # e.g. used up max_failures: a failure even after reporting checkpoints
                errors.setdefault(d, []).append(f"{label}{type(result.error).__name__}: {str(result.error).splitlines()[0]}")
                continue
            path = posixpath.join(src, f"d{d}", checkpoint_file) if src else None
            metrics = _read_best_metrics(path) if path and exists(path) else {}  # none: it diverged in its first epoch
            reason = reported(result, width_key(d, "stop_reason"))
            if not math.isfinite(metrics.get("mse", math.nan)):  # NaN never wins: `x < nan` is always false
                why = reason or (f"validation mse is {metrics['mse']}" if metrics else "no checkpoint was reported")
                unusable.setdefault(d, []).append(label + why)
                continue
            if d not in best or metrics[cfg.score_metric] < best[d][cfg.score_metric]:
                epochs = int(reported(result, width_key(d, "epochs_trained")) or 0)
                reason = reason or ("completed all epochs" if epochs >= cfg.num_epochs else "stopped by ASHA")
                best[d] = {"src": path, **metrics, "epochs": epochs, "stop_reason": reason, "learning_rate": lr,
                           "initial_cosine_similarity": reported(result, width_key(d, "initial_cosine_similarity"), 0),
                           **({"initial_downstream_kl": reported(result, width_key(d, "initial_downstream_kl"), 0)}
                              if cfg.objective in ("kl", "mse+kl") else {})}

    rows = []
    for d in sorted(set(best) | set(errors) | set(unusable)):
        row = row_head(d, d_model, cfg)
        if d in best:
            dest = cfg.export_path(d)
            _copy(best[d]["src"], dest)
            # A KL objective's trials were selected on the whole validation set's KL: the row keeps it (the
            # downstream pass below measures the same again, with top-1 agreement and CE beside it).
            row.update({k: best[d][k] for k in (*METRICS, *KL_METRICS, *PHASE2_METRICS) if k in best[d]})
            row.update({**pca_columns(limit, d, best[d]["mse"]), "obtained_by": "trained",
                        "learning_rate": best[d]["learning_rate"],
                        **{k: best[d][k] for k in ("initial_cosine_similarity", "initial_downstream_kl") if k in best[d]},
                        "best_epoch": best[d]["epoch"], "epochs_trained": best[d]["epochs"],
                        "stop_reason": best[d]["stop_reason"], "checkpoint": os.path.abspath(dest)})
            row["note"] = shortfall_note(row, cfg)
        failures = errors.get(d, []) + (unusable.get(d, []) if d not in best else [])
        if failures:  # with an lr grid, a D' may have an exported trial and failed ones
            row["error"] = "; ".join(failures)
        rows.append(row)
    return save_rows(rows, cfg)


def export_closed_form(cfg: Config, manifest: dict[str, Any], limit: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage 1a's mse sweep from the PCA start, without SGD: the top-D' eigenvectors of the training second
    moment are the training MSE's optimum, and the spectrum pass already measured them on the validation
    set (`pca.pca_metrics`). Each D' is exported with those metrics (its checkpoint, W&B run and row
    as a trained one's), so the shards are read once after extraction. `config`: what a trial would get."""
    vecs = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed)
    rows = []
    for d in cfg.d_values:
        weight = vecs[:, :d].T.float().contiguous()
        metrics = {**pca_metrics(limit, d), "orthonormality_error": orthonormality_error(weight)}
        dest, width_config = cfg.export_path(d), {**config, "d_compressed": d}
        save_checkpoint(dest, {WEIGHT_KEY: weight}, width_config, metrics[cfg.score_metric], {**metrics, "epoch": 0})
        log = tracking(cfg.use_wandb, 0, project=cfg.wandb_project, group=config["group"], name=cfg.wandb_name(d),
                       config=width_config, directory=cfg.output_dir)
        log.log(metrics)
        log.log_checkpoint(dest, metrics)
        log.finish()
        rows.append({**row_head(d, manifest["hidden_size"], cfg), **metrics, **pca_columns(limit, d, metrics["mse"]),
                     "obtained_by": "closed_form", "initial_cosine_similarity": metrics["cosine_similarity"],
                     "best_epoch": 0, "epochs_trained": 0, "stop_reason": CLOSED_FORM, "checkpoint": os.path.abspath(dest),
                     "note": None})
    return save_rows(rows, cfg)


CLOSED_FORM = "closed form: the top-D' eigenvectors of the training second moment (no SGD epoch)"


def row_head(d: int, d_model: int, cfg: Config) -> dict[str, Any]:
    return {"d_compressed": d, "d_model": d_model, "compression_ratio": d_model / d, "num_params": d_model * d,
            "objective": cfg.objective}


def pca_columns(limit: dict[str, Any], d: int, mse: float) -> dict[str, float]:
    """The PCA limit's references beside a compressor of validation `mse`, and how close it gets (pca_efficiency)."""
    return {"pca_mse": limit["pca_mse"][d], "pca_efficiency": limit["pca_mse"][d] / mse,
            **{f"pca_{k}": limit[f"pca_{k}"][d] for k in PCA_REFERENCES}}


def save_rows(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Mark each measured row against --kl_budget and write the results (json, csv): right after the export, so
    the trained results are safe on disk before any pass over them (`scoring.score`), and again after. The
    plot (`plot_report`) is drawn once, from the final rows."""
    for row in rows:
        if "downstream_kl" in row:
            row["within_kl_budget"] = row["downstream_kl"] <= cfg.kl_budget
    write_results(rows, cfg)
    return rows


def smallest_within_budget(rows: list[dict[str, Any]], kl_budget: float) -> dict[str, Any] | None:
    """The row of the smallest D' whose exported compressor's next-token KL is at most `kl_budget` (None: none is)."""
    return min((r for r in rows if r.get("downstream_kl", math.inf) <= kl_budget), key=lambda r: r["d_compressed"], default=None)


def budget_line(rows: list[dict[str, Any]], kl_budget: float) -> str | None:
    """The summary's verdict on --kl_budget, in one line (None when no row has a KL)."""
    measured = [r for r in rows if "downstream_kl" in r]
    if not measured:
        return None
    pick = smallest_within_budget(rows, kl_budget)
    if pick is None:
        best = min(measured, key=lambda r: r["downstream_kl"])
        return (f"kl budget {kl_budget:g} nats/token: no D' is within it; the best next-token KL is "
                f"{best['downstream_kl']:.4g} at D'={best['d_compressed']} (sweep wider D', or raise --kl_budget)")
    top1 = f", top-1 agreement {pick['top1_agreement']:.2%}" if "top1_agreement" in pick else ""
    return (f"kl budget {kl_budget:g} nats/token: the smallest D' within it is {pick['d_compressed']} "
            f"({pick['compression_ratio']:.1f}x; next-token KL {pick['downstream_kl']:.4g}{top1})")


def write_results(rows: list[dict[str, Any]], cfg: Config) -> None:
    write_json(cfg.results_path(), rows)
    pd.DataFrame(rows).to_csv(cfg.results_path(ext="csv"), index=False)


# The seed guide's expected cosine per D' (for D=3072): a reference line, not a measurement.
SEED_EXPECTED_COSINE = {64: 0.85, 128: 0.92, 256: 0.96, 512: 0.98, 1024: 0.99}


def plot_report(rows: list[dict[str, Any]], limit: dict[str, Any], cfg: Config, manifest: dict[str, Any]) -> None:
    """Against D': cosine and explained variance (uncentred and centred about the training mean), and the LM
    head's next-token KL (log scale, with --kl_budget and the smallest D' within it) and top-1 agreement;
    the trained compressors beside PCA (and for the cosine, the seed's guess)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_model = limit["hidden_size"]
    done = [r for r in rows if "checkpoint" in r]
    ds = [r["d_compressed"] for r in done]
    xs = curve_points(d_model, [r["d_compressed"] for r in rows])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.4))
    for ax, key, title in ((axes[0, 0], "cosine_similarity", "validation cosine similarity"),
                           (axes[0, 1], "explained_variance", "validation explained variance")):
        for prefix, style, label in (("", "-", "uncentred"), ("centred_", ":", "centred (read this)")):
            ax.plot(xs, [limit[f"pca_{prefix}{key}"][x] for x in xs], "k" + style, label=f"PCA, {label}")
            ax.plot(ds, [r[prefix + key] for r in done], "o" + style, color="tab:blue", label=f"trained (stage {cfg.stage}), {label}")
        if key == "cosine_similarity":
            seed = sorted(SEED_EXPECTED_COSINE.items())
            ax.plot([d for d, _ in seed], [c for _, c in seed], "s:", color="tab:orange", label="seed guide's expectation (D=3072)")
        ax.set_title(title)
    measured = [r for r in done if "downstream_kl" in r]
    pick = smallest_within_budget(measured, cfg.kl_budget)
    for ax, key, title in ((axes[1, 0], "downstream_kl", "LM head: next-token KL (nats/token)"),
                           (axes[1, 1], "top1_agreement", "LM head: top-1 agreement with the original")):
        have = [r for r in measured if key in r]
        if not have:
            ax.text(0.5, 0.5, "not measured (not the last layer, --no_downstream, or it failed)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
        else:
            pca = [r for r in have if f"pca_{key}" in r]
            ax.plot([r["d_compressed"] for r in pca], [r[f"pca_{key}"] for r in pca], "k--", marker="x", label="PCA")
            ax.plot([r["d_compressed"] for r in have], [r[key] for r in have], "o-", color="tab:blue", label=f"trained (stage {cfg.stage})")
            if pick is not None and key in pick:
                ax.plot([pick["d_compressed"]], [pick[key]], "*", color="tab:red", markersize=16,
                        label=f"smallest D' within the budget: {pick['d_compressed']}")
        if key == "downstream_kl":
            ax.axhline(cfg.kl_budget, color="tab:red", linestyle=":", label=f"--kl_budget {cfg.kl_budget:g}")
            ax.set_yscale("log")
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("D' (compressed width)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with nothing measured has only its note
            ax.legend(fontsize=7)
    fig.suptitle(f"{cfg.model_name} layer {cfg.layer}, D={d_model}: compressor quality vs D' (validation set)\n"
                 f"centred: about the training mean; excluded: {exclusions(manifest)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(cfg.results_path("report", "png"), dpi=110)
    plt.close(fig)


AT_LIMIT = 0.995  # pca_efficiency from which a compressor counts as at the PCA limit


def shortfall_note(row: dict[str, Any], cfg: Config) -> str | None:
    """For a trial that diverged, or a compressor short of the PCA limit: what happened, by how much and
    why, in one line (None at the limit)."""
    if row["stop_reason"].startswith("diverged"):
        return f"d{row['d_compressed']}: {row['stop_reason']}; exported: its best before that, epoch {row['best_epoch']}"
    if cfg.objective != "mse":  # a KL objective gives up mse for the LM head's KL by design: the KL columns tell
        return None
    eff = row["pca_efficiency"]
    if eff >= AT_LIMIT:
        return None
    start = "the stage 1a checkpoint" if cfg.init_checkpoint(row["d_compressed"]) else f"the {cfg.init} init"
    hint = ("a random start's subspace turns towards the top-D' one slowly; --init pca starts at the limit"
            if start == "the orthogonal init"
            else "more epochs (--num_epochs) or another --learning_rate may close the gap")
    return (f"d{row['d_compressed']}: validation mse {1 / eff - 1:.1%} above the PCA limit (pca_efficiency {eff:.4f}) "
            f"after {row['epochs_trained']} epochs from {start} at peak lr {row['learning_rate']:g}: {hint}")


def _read_best_metrics(path: str) -> dict[str, float]:
    return read_checkpoint(io.BytesIO(read_bytes(path)))["best_metrics"]  # the METRICS and the epoch they were reached at


def _copy(src: str, dest: str) -> None:
    """Copy, check, then rename: an existing export is replaced whole, by a checkpoint that loads, or not at all."""
    src_fs, src_p = filesystem(src)
    with atomic_output(dest) as (fs, tmp):
        pafs.copy_files(src_p, tmp, source_filesystem=src_fs, destination_filesystem=fs)
        load_checkpoint(tmp)  # a copy that does not load never replaces a good export


def print_table(rows: list[dict[str, Any]], cfg: Config) -> None:
    head = (f"{'D_prime':>8} {'ratio':>7} {'params':>10} {'mse':>11} {'cosine':>8} {'pca_cos':>8} {'c_cos':>8} "
            f"{'pca_c_cos':>9} {'c_expl':>8} {'pca_c_expl':>10} {'rel_err':>8} {'var_ratio':>9} {'pca_eff':>8} {'orth_err':>9} "
            f"{'KL':>9} {'pca_KL':>9} {'top1':>7} {'pca_top1':>8}  checkpoint")
    print("\n" + head + "\n" + "-" * len(head))
    nan = float("nan")
    for r in rows:
        if "checkpoint" not in r:
            print(f"{r['d_compressed']:>8} {r['compression_ratio']:>6.1f}x {r['num_params']:>10,}  FAILED: {r['error']}")
            continue
        print(f"{r['d_compressed']:>8} {r['compression_ratio']:>6.1f}x {r['num_params']:>10,} {r['mse']:>11.4g} "
              f"{r['cosine_similarity']:>8.4f} {r['pca_cosine_similarity']:>8.4f} {r['centred_cosine_similarity']:>8.4f} "
              f"{r['pca_centred_cosine_similarity']:>9.4f} {r['centred_explained_variance']:>8.4f} "
              f"{r['pca_centred_explained_variance']:>10.4f} {r['relative_error']:>8.4f} {r['variance_ratio']:>9.4f} "
              f"{r['pca_efficiency']:>8.4f} "
              f"{r['orthonormality_error']:>9.2g} {r.get('downstream_kl', nan):>9.3g} {r.get('pca_downstream_kl', nan):>9.3g} "
              f"{r.get('top1_agreement', nan):>7.4f} {r.get('pca_top1_agreement', nan):>8.4f}  {r['checkpoint']}")
        if "error" in r:  # an lr grid: the exported trial above, and failed ones of the same D'
            print(f"{'':>8} other trials of this D' FAILED: {r['error']}")
    for _, column, what in PASSES:
        for failure in sorted({r[column] for r in rows if column in r}):
            print(f"{what} FAILED: {failure}")
    if any(r.get("obtained_by") == "closed_form" for r in rows):
        print(f"\nEvery D' is PCA's {CLOSED_FORM}; its metrics are those of the exported weights on the validation set "
              "(held-out documents).")
    else:
        print("\nThe best epoch of each trial and the best learning rate of each D' are picked on the validation set these "
              "metrics are measured on (held-out documents, never trained on).")
    verdict = budget_line(rows, cfg.kl_budget)
    if verdict:
        print(verdict)
    for r in rows:
        if r.get("note"):
            print(f"note: {r['note']}")
    print(f"\nsummary: {cfg.results_path()} (and .csv); plot: {cfg.results_path('report', 'png')}\n", flush=True)
