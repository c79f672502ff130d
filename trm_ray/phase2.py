"""Stage 1b trained for both things LLM-TRM's phase 2 does with a compressor.

Phase 2 compresses the prompt's states before `<think>` (the `context` region) as its model's input,
and decompresses its output for the `</think>` position (the `close` region, one state a
conversation) straight into the LM head for the first answer token. So `--objective phase2` trains
each region for its own use: the context for reconstruction, its mse relative to the context's own
PCA limit at that D', and the closing state for what the head reads, its next-token KL relative to
what the closing states' own PCA costs. Each region's term is a mean over its own rows, so the
closing state counts as much as its weight says however rare it is (~0.35% of the rows):

    loss = mse_context / pca_mse_context + close_weight * KL_close / pca_KL_close

Selection (early stopping, the best epoch, ASHA, the export) follows `phase2_score`: the closing
state's KL relative to its PCA's, with a steep penalty once the context falls below CONTEXT_FLOOR
of its limit. What has a closed form is not trained: the start (`downstream.references_and_start`) is the best, on the training rows,
of the stage 1a weights and the top-D' eigenvectors of the mixed second moment
Σ_context / tr Σ_context + λ Σ_close / tr Σ_close over a grid of λ (one eigenproblem each), then
moved down the loss above with its context term in closed form (`refine_start`): only the closing
states are read, so every step sees hundreds of them, where a trial's batch holds a dozen.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from trm_ray.compressor import RECONSTRUCTION_SUMS, metrics_from_sums, reconstruction_sums, retract_, tangent_part
from trm_ray.kl import LMHead, damage_sums, grid_kl, next_token_kl
from trm_ray.loop import ONE_PROCESS, Comm

REGIONS = ("context", "close")
CONTEXT_FLOOR = 0.98  # context_pca_efficiency a phase-2 compressor must keep (the goal of stage 1b)
FLOOR_PENALTY = 100.0  # score per unit of mse/limit below the floor: 1% under it costs as much as doubling the close KL


def phase2_score(close_kl: float, close_pca_kl: float, context_pca_efficiency: float) -> float:
    """Lower is better: KL_close / PCA's KL_close, plus FLOOR_PENALTY times how far the context's
    mse / limit is above 1 / CONTEXT_FLOOR (0 while the context keeps CONTEXT_FLOOR of its limit)."""
    short = max(0.0, 1.0 / context_pca_efficiency - 1.0 / CONTEXT_FLOOR)
    return close_kl / max(close_pca_kl, 1e-12) + FLOOR_PENALTY * short


def region_codes(manifest: dict[str, Any]) -> dict[str, int]:
    """The `region` column's value of each phase-2 region in these shards."""
    return {r: manifest["regions"].index(r) for r in REGIONS}


def region_loss(lm_head: LMHead, close_weight: float, references: dict[int, tuple[float, float]],
                codes: dict[str, int]):
    """The per-token training loss [k] of `--objective phase2` for each compressor; `references`:
    D' -> (the context's PCA mse, the closing states' PCA KL). A batch without closing states trains
    the context alone; the teacher's logits are computed once for every width, on the closing rows only."""
    def loss(x: torch.Tensor, models: Sequence[nn.Module], region: torch.Tensor) -> torch.Tensor:
        context, close = x[region == codes["context"]], x[region == codes["close"]]
        refs = torch.tensor([references[m.weight.shape[0]] for m in models], dtype=x.dtype, device=x.device)
        mse = torch.stack([nn.functional.mse_loss(m(context), context) for m in models]) if len(context) else 0.0
        total = mse / refs[:, 0]
        if len(close):
            total = total + close_weight * grid_kl(lm_head, close, [m.weight for m in models]) / len(close) / refs[:, 1]
        return total

    return loss


@torch.no_grad()
def evaluate_regions(models: Sequence[nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]], mean: torch.Tensor,
                     lm_head: LMHead, codes: dict[str, int], comm: Comm = ONE_PROCESS) -> list[dict[str, float]]:
    """For each model, over one read of every batch: `loop.evaluate`'s metrics on all rows, the context
    rows' (`context_mse`, `context_cosine_similarity`) and, at the closing states, the head's next-token
    KL and top-1 agreement of the reconstruction (`close_downstream_kl`, `close_top1_agreement`, `close_tokens`).
    `batches`: this rank's share of the rows, summed over the ranks before any metric, as `loop.evaluate` does."""
    recon = torch.zeros(len(models), 2, RECONSTRUCTION_SUMS, dtype=torch.float64, device=comm.device)  # all, context
    close = torch.zeros(len(models), 4, dtype=torch.float64, device=comm.device)  # KL, CE (no targets), top-1, rows
    for x, region in batches:
        context, closing = region == codes["context"], region == codes["close"]
        for i, model in enumerate(models):
            x_hat = model(x)
            recon[i] += torch.stack([reconstruction_sums(x, x_hat, mean),
                                     reconstruction_sums(x[context], x_hat[context], mean)]).to(recon.device)
        rows = x[closing]
        found = damage_sums(lm_head, rows, torch.full((len(rows),), -1), dict(enumerate(models)))
        close[:, :3] += torch.stack([found[i] for i in range(len(models))]).to(close.device)
        close[:, 3] += len(rows)
    recon, close = comm.summed(recon).cpu(), comm.summed(close).cpu()
    out = []
    for i, (kl, _, agree, n_close) in enumerate(close.tolist()):
        context = metrics_from_sums(recon[i, 1])
        out.append({**metrics_from_sums(recon[i, 0]), "context_mse": context["mse"],
                    "context_cosine_similarity": context["cosine_similarity"],
                    "close_downstream_kl": kl / max(n_close, 1), "close_top1_agreement": agree / max(n_close, 1),
                    "close_tokens": int(n_close)})
    return out


def add_scores(m: dict[str, float], context_pca_mse: float, close_pca_kl: float) -> None:
    """`m` (a width's validation metrics) gains the references, the context's efficiency and `phase2_score`."""
    eff = context_pca_mse / m["context_mse"]
    m.update({"context_pca_mse": context_pca_mse, "context_pca_efficiency": eff, "close_pca_downstream_kl": close_pca_kl,
              "phase2_score": phase2_score(m["close_downstream_kl"], close_pca_kl, eff)})


CODE_NOISE = 0.01  # mean square of the error phase 2 makes in D' space, as a fraction of ||z||² (what the benchmark adds)


def noisy_code_kl(lm_head: LMHead, h: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
    """Mean KL(p(h) || p(Wᵀ(z + e))) over the rows h, z = W h, e = `noise` (standard normal, [n, D']) scaled to a
    mean square of `level` ||z||² / D' per row: what the head reads from a code phase 2 got slightly wrong."""
    z = h @ w.T
    z = z + noise * (level * z.pow(2).sum(-1, keepdim=True) / z.shape[1]).sqrt()
    return next_token_kl(lm_head, h, z @ w) / len(h)


REFINE_STEPS, REFINE_BATCH = 200, 256  # steps, and training closing states a step, of the start's refinement


def refine_start(weight: torch.Tensor, sigma_context: torch.Tensor, context_limit: float, close: torch.Tensor,
                 lm_head: LMHead, close_ref: float, close_weight: float, steps: int = REFINE_STEPS, lr: float = 1e-3,
                 batch: int = REFINE_BATCH, seed: int = 0, code_noise: float = CODE_NOISE) -> torch.Tensor:
    """`weight` (orthonormal rows) moved down `--objective phase2`'s loss on the training rows before any trial:
    the context's term in closed form, tr Σ - tr(W Σ Wᵀ) over the context's PCA limit (`sigma_context`: its
    uncentred second moment, the sum of its squared rows over their count, as the mse sums it), and the closing
    states' KL over `close_ref` on batches of `close` (the training closing states). A trial sees ~0.35% of its
    rows as closing states, a dozen a batch, under the noise of its context rows' mse; here every step reads
    `batch` closing states and the context exactly, so the close KL gets as low as the context's term lets it.
    Riemannian Adam (the tangent part of the gradient and of the momentum, a QR retraction) as the trials
    step, with a cosine decay of `lr` to zero. Gradients are on even where the caller's pass turned them off.

    The closing state's KL is read through a code with phase 2's own error in it (`noisy_code_kl`): without it,
    the subspace found crowds the directions the head is most sensitive to, and phase 2's error in D' space
    then costs up to twice the closed form's KL at the head (benchmarks/RESULTS.md)."""
    sigma = sigma_context.to(close.device, torch.float32)
    total = float(sigma.trace())
    w = weight.detach().to(close.device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = close[torch.randperm(len(close), generator=generator)[:batch].to(close.device)]
        noise = torch.randn(len(rows), w.shape[0], generator=generator).to(close.device)
        with torch.enable_grad():
            context = (total - (w @ sigma @ w.T).trace()) / context_limit
            loss = context + close_weight * noisy_code_kl(lm_head, rows, w, noise, code_noise) / close_ref
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        w.grad = tangent_part(w, w.grad)
        optimizer.step()
        schedule.step()
        retract_(w, optimizer)
    return w.detach()
