"""The quality limit: for a tied linear map x -> WᵀWx under MSE, the best D' is known.

The optimum is the top-D' principal subspace of the uncentred second moment E[xxᵀ] of the
training hidden states (no centring: the compressor has no bias). One Ray Data pass over
the training shards accumulates XᵀX in float64; its eigen-decomposition gives, for every D'
at once, the best reachable training MSE and explained variance, and one pass over the
validation documents gives the PCA reconstruction's validation MSE, explained variance and
mean cosine (the cosine of the MSE-optimal reconstruction: PCA maximises the energy kept,
not the mean cosine, so a trained compressor may score a hair above it). Stored
beside the shards (`spectrum.json`, eigenvectors in `spectrum.pt`), computed once per shard
set and split, reused by every trial and sweep; stored with the manifest's key, so shards
extracted again (another model, corpus or setting) never reuse a stale limit.

    python -m trm_ray.spectrum <shards_dir>
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc
import torch

from trm_ray.cluster import cpu_tasks
from trm_ray.hidden import decode_hidden
from trm_ray.names import PCA_METRICS
from trm_ray.pca import curve_points, eigen, moment_sums, moment_zeros, pca_summary, pca_val_sums, pca_val_zeros
from trm_ray.references import store, stored_json
from trm_ray.shards import read_manifest, region_code, rows_per_block, shard_paths, side_tables


def summed(shards_dir: str, val_side: bool, val_fraction: float, seed: int, fn: Callable[..., dict[str, Any]],
           zeros: dict[str, Any], *args: Any, region: str | None = None) -> dict[str, Any]:
    """One distributed pass over one side of the split (with `region`, over that region's rows only): `fn`
    gives the sums of a block's rows (float64 [rows, D]), and each task adds up those of all its shards, so one partial per task reaches
    the driver, not one per block (a float64 DxD is 32 MiB at D=2048: per block that was ~50 GB through
    the object store at 105 GB of shards)."""
    import ray

    manifest = read_manifest(shards_dir)
    paths = shard_paths(shards_dir, manifest)
    rows = rows_per_block(manifest)
    code = region_code(manifest, region)

    def task(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        total = dict(zeros)
        for path in batch["path"]:
            for table in side_tables(str(path), val_fraction, seed, val_side, rows,
                                     ["doc_id", "hidden"] + (["region"] if code is not None else [])):
                if code is not None:
                    table = table.filter(pc.equal(table["region"], code))
                part = fn(decode_hidden(table["hidden"]).double(), *args)
                total = {k: total[k] + part[k] for k in total}
        return {k: np.asarray(v)[None] for k, v in total.items()}

    tasks = max(1, min(len(paths), cpu_tasks()))
    parts = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=tasks)
    total = dict(zeros)
    for part in parts.map_batches(task, batch_size=None, batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy"):
        total = {k: total[k] + part[k].sum(0) for k in total}
    return total


def second_moment(shards_dir: str, val_fraction: float, seed: int, d_model: int, region: str | None = None) -> dict[str, Any]:
    """XᵀX, per-dimension sums and the row count of the training rows (of `region`), one distributed pass, float64."""
    return summed(shards_dir, False, val_fraction, seed, moment_sums, moment_zeros(d_model), region=region)


def compute_spectrum(shards_dir: str, val_fraction: float, seed: int, region: str | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """(summary, eigenvectors as columns, largest eigenvalue first); with `region`, the limit of that
    region alone: the spectrum of its training rows, evaluated on its validation rows."""
    manifest = read_manifest(shards_dir)
    d = manifest["hidden_size"]
    m = second_moment(shards_dir, val_fraction, seed, d, region)
    evals, evecs = eigen(m["xtx"])
    sums = summed(shards_dir, True, val_fraction, seed, pca_val_sums, pca_val_zeros(d), np.ascontiguousarray(evecs),
                  m["sum"] / m["n"], region=region)
    summary = {"split": {"val_fraction": val_fraction, "seed": seed}, "region": region, **pca_summary(m, evals, evecs, sums)}
    return summary, evecs


def load_or_compute(shards_dir: str, val_fraction: float, seed: int, region: str | None = None) -> dict[str, Any]:
    """The stored spectrum of this shard set and split (of one region's rows: `spectrum-<region>-...`),
    computed (and stored) on first use, and again when the shards changed (another manifest) or it
    predates the PCA references of every metric."""
    name = f"spectrum-{region}" if region else "spectrum"
    summary = stored_json(shards_dir, val_fraction, seed, name)
    if summary is not None and all(f"pca_{k}" in summary for k in PCA_METRICS):
        return summary
    print(f"spectrum: one pass over {shards_dir}{f' ({region} rows)' if region else ''} for the second moment and its "
          "eigenvectors", flush=True)
    summary, evecs = compute_spectrum(shards_dir, val_fraction, seed, region)
    store(shards_dir, val_fraction, seed, name, {"eigenvectors": torch.from_numpy(evecs)}, summary)
    return stored_json(shards_dir, val_fraction, seed, name)


def main(argv: list[str] | None = None) -> None:
    from trm_ray.cli import run_cli
    from trm_ray.cluster import connect
    from trm_ray.config import make_config

    parser = argparse.ArgumentParser(prog="python -m trm_ray.spectrum", description=__doc__.splitlines()[0])
    parser.add_argument("shards_dir")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num_cpus", type=int, default=None)

    def run() -> None:
        args = parser.parse_args(argv)
        connect(make_config({"num_cpus": args.num_cpus}))
        s = load_or_compute(args.shards_dir, args.val_fraction, args.seed)
        d = s["hidden_size"]
        print(f"\nPCA limit of a tied linear compressor, D={d}, {s['train_tokens']:,} train / {s['val_tokens']:,} validation tokens")
        print(f"{'D_prime':>8} {'train_explained_var':>20} {'val_explained_var':>18} {'val_pca_mse':>12} {'val_pca_cosine':>15} "
              f"{'val_centred_var':>16} {'val_centred_cos':>16}")
        for k in curve_points(d):
            print(f"{k:>8} {s['explained_variance'][k]:>20.4f} {s['pca_explained_variance'][k]:>18.4f} "
                  f"{s['pca_mse'][k]:>12.4g} {s['pca_cosine_similarity'][k]:>15.4f} "
                  f"{s['pca_centred_explained_variance'][k]:>16.4f} {s['pca_centred_cosine_similarity'][k]:>16.4f}")

    run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])

