"""PCA from moment sums, no data reading: the eigenvectors of a second moment, the PCA limit of every D' from
sums over validation rows (so one pass over the rows measures every width at once), the references read
off a stored spectrum, and PCA in the LM head's Fisher metric (`--init fisher`'s start).

The sums are float64 and additive: a pass over the shards adds up each block's (`trm_ray.spectrum`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trm_ray.names import PCA_METRICS


def moment_sums(x: torch.Tensor) -> dict[str, Any]:
    """XᵀX, Σx, Σx² and the count of rows `x` (float64 [rows, D])."""
    return {"xtx": (x.T @ x).numpy(), "sum": x.sum(0).numpy(), "sumsq": (x ** 2).sum(0).numpy(), "n": x.shape[0]}


def moment_zeros(d: int) -> dict[str, Any]:
    return {"xtx": np.zeros((d, d)), "sum": np.zeros(d), "sumsq": np.zeros(d), "n": 0}


def pca_val_sums(x: torch.Tensor, eigenvectors: np.ndarray, mean: np.ndarray) -> dict[str, Any]:
    """Per-D' sums over validation rows: ||x - P_k x||², cos(x, P_k x) = ||P_k x|| / ||x|| and the centred
    cos(P_k x - μ, x - μ) (μ: the training mean); and Σx, Σ||x||², Σ||x - μ||²."""
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


def pca_val_zeros(d: int) -> dict[str, Any]:
    return {"err": np.zeros(d + 1), "sum": np.zeros(d), "cos": np.zeros(d + 1), "centred_cos": np.zeros(d + 1), "energy": 0.0,
            "centred_energy": 0.0, "n": 0}


def eigen(xtx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues clipped at 0, eigenvectors as columns), largest first."""
    evals, evecs = np.linalg.eigh(xtx)
    order = np.argsort(evals)[::-1]
    return np.clip(evals[order], 0, None), evecs[:, order]


def pca_summary(m: dict[str, Any], evals: np.ndarray, evecs: np.ndarray, sums: dict[str, Any]) -> dict[str, Any]:
    """The PCA limit of every D' (0..D) from the training rows' moment sums `m`, their eigen decomposition and
    the validation rows' `pca_val_sums`: what a spectrum stores."""
    d = evecs.shape[0]
    n = int(m["n"])
    total = float(np.trace(m["xtx"]))
    captured = np.concatenate([[0.0], np.cumsum(evals)])  # index k: energy in the top-k subspace
    mean = m["sum"] / n
    # What metrics_from_sums derives from the reconstructions' sums, for P_k x at every k: Σ||P_k x||² is the
    # energy kept, and the sum of P_k x's elements is Σ_{j<=k} (1ᵀv_j)(v_jᵀ Σx).
    elements = sums["n"] * d
    kept = float(sums["energy"]) - sums["err"]
    x_sum = evecs.T @ sums["sum"]
    kept_sum = np.concatenate([[0.0], np.cumsum(evecs.sum(0) * x_sum)])
    var_x = float(sums["energy"]) / elements - (float(sums["sum"].sum()) / elements) ** 2
    summary = {
        "hidden_size": d,
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
    return summary


def pca_metrics(summary: dict[str, Any], d: int) -> dict[str, float]:
    """The validation metrics of the PCA compressor of width d (its rows the top-d eigenvectors), from the
    spectrum pass's sums: what `loop.evaluate` measures on the same rows, without reading them again."""
    return {k: summary[f"pca_{k}"][d] for k in PCA_METRICS}


def moment_matrix(summary: dict[str, Any], vecs: torch.Tensor) -> torch.Tensor:
    """E[xxᵀ] of the training rows (float64 [D, D], on `vecs`' device) from a stored spectrum and its eigenvectors."""
    return (vecs * torch.tensor(summary["eigenvalues"], dtype=torch.float64, device=vecs.device)) @ vecs.T


def curve_points(d_model: int, extra: list[int] = ()) -> list[int]:
    points = {2 ** i for i in range(int(np.log2(d_model)) + 1) if 2 ** i < d_model} | set(extra)
    return sorted(d for d in points if 0 < d < d_model)


def fisher_basis(fisher: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns whose first k span, for every k, PCA's subspace in the metric F: F^-½
    times the top eigenvectors of F^½ Σ F^½, orthonormalised (phase 2 needs a projection)."""
    evals, evecs = torch.linalg.eigh((fisher + fisher.T) / 2)
    evals = evals.clamp_min(1e-6 * float(evals.max()))  # a direction no logit reads would make F^-½ blow up
    half, inv_half = ((evecs * evals ** e) @ evecs.T for e in (0.5, -0.5))
    g_evals, g_vecs = torch.linalg.eigh(half @ sigma @ half)
    return torch.linalg.qr(inv_half @ g_vecs[:, g_evals.argsort(descending=True)])[0]


def quadratic_kl(fisher: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[D + 1]: for every k, ½ tr(F (I - P_k) Σ (I - P_k)), P_k the projection onto basis[:, :k]
    (orthonormal columns): the mean KL of the reconstruction P_k x to second order, E[½ δᵀ F δ] with
    δ = (I - P_k) x, F the mean Fisher information and Σ = E[xxᵀ]. In the basis's coordinates it is
    half the sum of (F̃ ∘ Σ̃)_ij over i, j >= k, every k at once from one reversed 2-D cumulative sum."""
    m = (basis.T @ fisher @ basis) * (basis.T @ sigma @ basis)
    tail = m.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1).diagonal()
    return 0.5 * torch.cat([tail, tail.new_zeros(1)])
