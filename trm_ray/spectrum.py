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
import hashlib
import io
import json
import sys
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from trm_ray.config import UserError
from trm_ray.names import PCA_METRICS, spectrum_files
from trm_ray.files import exists, read_bytes, read_json, write_bytes, write_json
from trm_ray.shards import decode_hidden, read_manifest, rows_per_block, shard_paths, side_tables

def manifest_key(shards_dir: str) -> str:
    """A digest of the shards' manifest: what every file derived from the shards (spectrum, Fisher
    start, PCA KL) records, so that shards extracted again make them be computed again."""
    return hashlib.sha256(json.dumps(read_manifest(shards_dir), sort_keys=True).encode()).hexdigest()[:16]


def _moment_sums(batch: pa.Table) -> dict[str, Any]:
    x = decode_hidden(batch["hidden"]).double()
    return {"xtx": (x.T @ x).numpy(), "sum": x.sum(0).numpy(), "sumsq": (x ** 2).sum(0).numpy(), "n": x.shape[0]}


def summed(shards_dir: str, val_side: bool, val_fraction: float, seed: int, fn: Callable[..., dict[str, Any]],
           zeros: dict[str, Any], *args: Any, region: str | None = None) -> dict[str, Any]:
    """One distributed pass over one side of the split (with `region`, over that region's rows only): `fn`
    gives a block's sums, and each task adds up those of all its shards, so one partial per task reaches
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
                part = fn(table, *args)
                total = {k: total[k] + part[k] for k in total}
        return {k: np.asarray(v)[None] for k, v in total.items()}

    tasks = max(1, min(len(paths), int(ray.cluster_resources().get("CPU", 1))))
    parts = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=tasks)
    total = dict(zeros)
    for part in parts.map_batches(task, batch_size=None, batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy"):
        total = {k: total[k] + part[k].sum(0) for k in total}
    return total


def region_code(manifest: dict[str, Any], region: str | None) -> int | None:
    """The `region` column's value for `region` (None: every row); a UserError for shards without it."""
    if region is None:
        return None
    if region not in manifest.get("regions", []):
        raise UserError(f"these shards have no {region!r} region (theirs: {manifest.get('regions') or 'none, stage 1a'}): "
                        "re-extract them as stage 1b shards")
    return manifest["regions"].index(region)


def second_moment(shards_dir: str, val_fraction: float, seed: int, d_model: int, region: str | None = None) -> dict[str, Any]:
    """XᵀX, per-dimension sums and the row count of the training rows (of `region`), one distributed pass, float64."""
    return summed(shards_dir, False, val_fraction, seed, _moment_sums,
                  {"xtx": np.zeros((d_model, d_model)), "sum": np.zeros(d_model), "sumsq": np.zeros(d_model), "n": 0},
                  region=region)


def _pca_val_sums(batch: pa.Table, eigenvectors: np.ndarray, mean: np.ndarray) -> dict[str, Any]:
    """Per-D' sums over validation rows: ||x - P_k x||², cos(x, P_k x) = ||P_k x|| / ||x|| and the centred
    cos(P_k x - μ, x - μ) (μ: the training mean); and Σx, Σ||x||², Σ||x - μ||²."""
    x = decode_hidden(batch["hidden"]).double()
    vecs = torch.tensor(eigenvectors)  # a copy: Ray hands the array over read-only
    z = x @ vecs  # eigenbasis coordinates, largest first
    zeros = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    kept = torch.cat([zeros, (z ** 2).cumsum(1)], 1)  # ||P_k x||², k = 0..D
    norm2 = (x ** 2).sum(1, keepdim=True)
    # Centred, in the same basis: P_k x - μ has coordinates z_i - m_i for i <= k and -m_i beyond.
    m = torch.tensor(mean) @ vecs
    zc = z - m
    inside = torch.cat([zeros, (zc ** 2).cumsum(1)], 1)  # Σ_{i<=k} (z_i - m_i)²
    cross = -(m * zc)  # (P_k x - μ)_i (x - μ)_i for i > k
    beyond_cross = cross.sum(1, keepdim=True) - torch.cat([zeros, cross.cumsum(1)], 1)
    beyond_m2 = float((m ** 2).sum()) - torch.cat([torch.zeros(1, dtype=torch.float64), (m ** 2).cumsum(0)])
    centred_norm2 = inside[:, -1:]  # ||x - μ||²
    centred_cos = (inside + beyond_cross) / ((inside + beyond_m2) * centred_norm2).sqrt().clamp_min(1e-30)
    return {"err": (norm2 - kept).clamp_min(0).sum(0).numpy(), "sum": x.sum(0).numpy(),
            "cos": (kept.sqrt() / norm2.sqrt().clamp_min(1e-30)).sum(0).numpy(),
            "centred_cos": centred_cos.sum(0).numpy(),
            "energy": float(norm2.sum()), "centred_energy": float(centred_norm2.sum()), "n": x.shape[0]}


def compute_spectrum(shards_dir: str, val_fraction: float, seed: int, region: str | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """(summary, eigenvectors as columns, largest eigenvalue first); with `region`, the limit of that
    region alone: the spectrum of its training rows, evaluated on its validation rows."""
    manifest = read_manifest(shards_dir)
    d = manifest["hidden_size"]
    m = second_moment(shards_dir, val_fraction, seed, d, region)
    evals, evecs = np.linalg.eigh(m["xtx"])
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    n = int(m["n"])
    total = float(np.trace(m["xtx"]))
    captured = np.concatenate([[0.0], np.cumsum(evals)])  # index k: energy in the top-k subspace

    mean = m["sum"] / n
    sums = summed(shards_dir, True, val_fraction, seed, _pca_val_sums,
                  {"err": np.zeros(d + 1), "sum": np.zeros(d), "cos": np.zeros(d + 1), "centred_cos": np.zeros(d + 1), "energy": 0.0,
                   "centred_energy": 0.0, "n": 0}, np.ascontiguousarray(evecs), mean, region=region)
    # What metrics_from_sums derives from the reconstructions' sums, for P_k x at every k: Σ||P_k x||² is the
    # energy kept, and the sum of P_k x's elements is Σ_{j<=k} (1ᵀv_j)(v_jᵀ Σx).
    elements = sums["n"] * d
    kept = float(sums["energy"]) - sums["err"]
    x_sum = evecs.T @ sums["sum"]
    kept_sum = np.concatenate([[0.0], np.cumsum(evecs.sum(0) * x_sum)])
    var_x = float(sums["energy"]) / elements - (float(sums["sum"].sum()) / elements) ** 2
    summary = {
        "split": {"val_fraction": val_fraction, "seed": seed}, "region": region, "hidden_size": d,
        "train_tokens": n, "val_tokens": int(sums["n"]),
        "eigenvalues": (evals / n).tolist(),  # of E[xxᵀ]
        # Arrays below are indexed by D' (0..D).
        "explained_variance": (captured / total).tolist(),  # training split
        "train_pca_mse": ((total - captured) / (n * d)).tolist(),
        # Validation split, like the trained compressors' metrics (1 - ||X - PX||²_F / ||X||²_F, uncentred).
        "pca_explained_variance": (1.0 - sums["err"] / float(sums["energy"])).tolist(),
        "pca_mse": (sums["err"] / (sums["n"] * d)).tolist(),
        "pca_cosine_similarity": (sums["cos"] / sums["n"]).tolist(),
        "pca_relative_error": np.sqrt(sums["err"] / float(sums["energy"])).tolist(),
        "pca_variance_ratio": ((kept / elements - (kept_sum / elements) ** 2) / var_x).tolist(),
        # Centred about the training mean (what the trained compressors' centred_* are measured about).
        "pca_centred_explained_variance": (1.0 - sums["err"] / float(sums["centred_energy"])).tolist(),
        "pca_centred_cosine_similarity": (sums["centred_cos"] / sums["n"]).tolist(),
        "mean": mean.tolist(), "variance": (m["sumsq"] / n - mean ** 2).tolist(),  # of the training rows
    }
    return summary, evecs


def load_or_compute(shards_dir: str, val_fraction: float, seed: int, region: str | None = None) -> dict[str, Any]:
    """The stored spectrum of this shard set and split (of one region's rows: `spectrum-<region>-...`),
    computed (and stored) on first use, and again when the shards changed (another manifest) or it
    predates the PCA references of every metric."""
    json_path, pt_path = spectrum_files(shards_dir, val_fraction, seed, f"spectrum-{region}" if region else "spectrum")
    summary, key = read_json(json_path), manifest_key(shards_dir)
    if summary is not None and all(f"pca_{k}" in summary for k in PCA_METRICS) and summary.get("manifest") == key:
        return summary
    print(f"spectrum: one pass over {shards_dir}{f' ({region} rows)' if region else ''} for the second moment and its "
          "eigenvectors", flush=True)
    summary, evecs = compute_spectrum(shards_dir, val_fraction, seed, region)
    summary["manifest"] = key
    buf = io.BytesIO()
    torch.save({"eigenvectors": torch.from_numpy(evecs), "split": summary["split"], "manifest": key}, buf)
    write_bytes(pt_path, buf.getvalue())
    write_json(json_path, summary)  # last: a spectrum's .json always has its eigenvectors beside it
    return summary


def stored(shards_dir: str, val_fraction: float, seed: int, name: str = "spectrum") -> dict[str, Any] | None:
    """The .pt stored for this split under `name` (eigenvectors and what else it holds), or None when
    there is none or it was computed from other shards than these."""
    _, pt_path = spectrum_files(shards_dir, val_fraction, seed, name)
    if not exists(pt_path):
        return None
    found = torch.load(io.BytesIO(read_bytes(pt_path)), weights_only=True)
    if found["split"] != {"val_fraction": val_fraction, "seed": seed}:  # a renamed or copied file
        raise UserError(f"{pt_path} holds the spectrum of split {found['split']}: delete it to recompute")
    return found if found.get("manifest") == manifest_key(shards_dir) else None


def eigenvectors(shards_dir: str, val_fraction: float, seed: int, name: str = "spectrum") -> torch.Tensor:
    """The eigenvectors of this split's training second moment (columns, largest eigenvalue first);
    name="fisher": those of the same PCA in the LM head's Fisher metric (`downstream.fisher_start`)."""
    found = stored(shards_dir, val_fraction, seed, name)
    if found is None:
        raise UserError(f"{spectrum_files(shards_dir, val_fraction, seed, name)[1]} is missing or was computed from other "
                        "shards: a sweep computes it again (and python -m trm_ray.spectrum the spectrum)")
    return found["eigenvectors"]


def pca_metrics(summary: dict[str, Any], d: int) -> dict[str, float]:
    """The validation metrics of the PCA compressor of width d (its rows the top-d eigenvectors), from the
    spectrum pass's sums: what `train.evaluate` measures on the same rows, without reading them again."""
    return {k: summary[f"pca_{k}"][d] for k in PCA_METRICS}


def moment_matrix(summary: dict[str, Any], vecs: torch.Tensor) -> torch.Tensor:
    """E[xxᵀ] of the training rows (float64 [D, D], on `vecs`' device) from a stored spectrum and its eigenvectors."""
    return (vecs * torch.tensor(summary["eigenvalues"], dtype=torch.float64, device=vecs.device)) @ vecs.T


def training_mean(shards_dir: str, val_fraction: float, seed: int) -> torch.Tensor:
    """The training rows' mean [D] (float64, from the stored spectrum): what the centred metrics are centred about."""
    return torch.tensor(read_json(spectrum_files(shards_dir, val_fraction, seed)[0])["mean"], dtype=torch.float64)


def curve_points(d_model: int, extra: list[int] = ()) -> list[int]:
    points = {2 ** i for i in range(int(np.log2(d_model)) + 1) if 2 ** i < d_model} | set(extra)
    return sorted(d for d in points if 0 < d < d_model)


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

