"""After the sweep: copy each D's best checkpoint into the seed's layout and summarise them.

The numbers in `sweep_results.json` are read back from the exported checkpoint files
themselves (their `best_metrics`), so the summary can never disagree with what was saved.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs
import torch

from trm_ray.compressor import METRICS, load_checkpoint
from trm_ray.config import Config
from trm_ray.shards import filesystem, write_json


def export_path(cfg: Config, d_compressed: int, stage: str | None = None) -> str:
    name = f"stage{stage or cfg.stage}_best.pt"
    if cfg.sweep:
        return os.path.join(cfg.output_dir, f"d{d_compressed}", name)
    return os.path.join(cfg.output_dir, name)


def results_path(cfg: Config) -> str:
    """sweep_results.json for stage 1a; stage 1b's sits beside it without replacing it."""
    name = "sweep_results.json" if cfg.stage == "1a" else f"sweep_results_stage{cfg.stage}.json"
    return os.path.join(cfg.output_dir, name)


def best_checkpoint_path(result: Any) -> str | None:
    """The trial's latest checkpoint, whose compressor.pt holds the trial's best weights."""
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df or df["checkpoint_path"].isna().all():
        return None
    return df["checkpoint_path"].dropna().iloc[-1]


def initial_cosine(result: Any) -> float | None:
    """Validation cosine of the weights the trial started from (for 1b: the 1a compressor)."""
    df = result.metrics_dataframe
    if df is None or "initial_cosine_similarity" not in df:
        return None
    return float(df["initial_cosine_similarity"].dropna().iloc[0])


def export_results(grid: Any, cfg: Config, d_model: int, checkpoint_file: str) -> list[dict[str, Any]]:
    """Export the best checkpoint per D' and write `<output_dir>/sweep_results.json`."""
    best: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    for result in grid:
        d = int(result.config["d_compressed"])
        src = best_checkpoint_path(result)
        if src is None:
            errors[d] = str(result.error).splitlines()[0] if result.error else "no checkpoint was reported"
            continue
        src = posixpath.join(src, checkpoint_file)
        metrics = _read_best_metrics(src)
        if d not in best or metrics["mse"] < best[d]["mse"]:
            epochs = int(result.metrics.get("epoch", 0))
            reason = result.metrics.get("stop_reason") or (
                "completed all epochs" if epochs >= cfg.num_epochs else "stopped by ASHA")
            best[d] = {"src": src, **metrics, "epochs": epochs, "stop_reason": reason,
                       "initial_cosine_similarity": initial_cosine(result)}

    rows = []
    for d in sorted(set(best) | set(errors)):
        row: dict[str, Any] = {"d_compressed": d, "d_model": d_model, "compression_ratio": d_model / d,
                               "num_params": d_model * d}
        if d in best:
            dest = export_path(cfg, d)
            _copy(best[d]["src"], dest)
            row.update({k: best[d][k] for k in METRICS})
            row.update({"initial_cosine_similarity": best[d]["initial_cosine_similarity"],
                        "best_epoch": best[d]["epoch"], "epochs_trained": best[d]["epochs"],
                        "stop_reason": best[d]["stop_reason"], "checkpoint": os.path.abspath(dest)})
        else:
            row["error"] = errors[d]
        rows.append(row)
    write_json(results_path(cfg), rows)
    return rows


def _read_best_metrics(path: str) -> dict[str, float]:
    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    return {**ckpt["best_metrics"], "epoch": int(ckpt["best_metrics"].get("epoch", 0))}


def _copy(src: str, dest: str) -> None:
    """Copy then rename, so an existing export is replaced whole or not at all."""
    src_fs, src_p = filesystem(src)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp"
    pafs.copy_files(src_p, os.path.abspath(tmp), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
    os.replace(tmp, dest)
    load_checkpoint(dest)  # refuse to report a copy that does not load


def print_table(rows: list[dict[str, Any]], cfg: Config) -> None:
    head = f"{'D_prime':>8} {'ratio':>7} {'params':>10} {'mse':>11} {'cosine':>8} {'rel_err':>8} {'var_ratio':>9}  checkpoint"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['d_compressed']:>8} {r['compression_ratio']:>6.1f}x {r['num_params']:>10,}  FAILED: {r['error']}")
            continue
        print(f"{r['d_compressed']:>8} {r['compression_ratio']:>6.1f}x {r['num_params']:>10,} {r['mse']:>11.4g} "
              f"{r['cosine_similarity']:>8.4f} {r['relative_error']:>8.4f} {r['variance_ratio']:>9.4f}  {r['checkpoint']}")
    print(f"\nsummary: {results_path(cfg)}\n", flush=True)

