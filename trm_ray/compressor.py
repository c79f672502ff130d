"""The weight-tied dimension compressor, its reconstruction metrics, and its checkpoint file.

[.., D] -> W x -> [.., D'] -> Wᵀ z -> [.., D]. One D'xD matrix does both directions, so the
model has D*D' parameters and its optimum under MSE is a projection onto a principal
subspace (see DESIGN.md). Metrics are kept as float64 sums so that they can be added up
across batches and DDP ranks and give exactly the token-weighted value over the whole set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trm_ray.config import UserError

# What a checkpoint records of its compressor: validation reconstruction metrics, and how far W's rows are from orthonormal.
METRICS = ("mse", "cosine_similarity", "relative_error", "variance_ratio", "explained_variance", "orthonormality_error")


class DimensionCompressor(nn.Module):
    def __init__(self, d_model: int, d_compressed: int):
        super().__init__()
        if not 0 < d_compressed < d_model:
            raise UserError(
                f"d_compressed (D') must be between 1 and D-1 = {d_model - 1} for this model's hidden size "
                f"D = {d_model}, got {d_compressed}"
            )
        self.d_model = d_model
        self.d_compressed = d_compressed
        self.weight = nn.Parameter(torch.empty(d_compressed, d_model))
        # Orthonormal rows make Wᵀ W a projection from step 0: the reconstruction starts
        # sensible and the tied decoder starts as the encoder's exact inverse on its span.
        nn.init.orthogonal_(self.weight)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decompress(self.compress(x))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> "DimensionCompressor":
        ckpt = load_checkpoint(path, map_location)
        weight = ckpt["compressor"]["weight"]
        model = cls(weight.shape[1], weight.shape[0])
        model.load_state_dict(ckpt["compressor"])
        return model


def reconstruction_sums(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Float64 sums over a batch of token rows [N, D], from which `metrics_from_sums` derives every metric."""
    x = x.double()
    x_hat = x_hat.double()
    cos = nn.functional.cosine_similarity(x_hat, x, dim=-1, eps=1e-12)
    return torch.stack([
        ((x_hat - x) ** 2).sum(),  # squared error
        (x ** 2).sum(),
        x.sum(),
        (x_hat ** 2).sum(),
        x_hat.sum(),
        cos.sum(),
        torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),  # tokens
        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),  # elements
    ])


def metrics_from_sums(s: torch.Tensor) -> dict[str, float]:
    """Token-weighted metrics over everything summed into `s`.

    mse: mean over elements; cosine_similarity: mean over tokens; relative_error:
    ||X̂ - X||_F / ||X||_F; variance_ratio: Var(X̂) / Var(X) over all elements;
    explained_variance: 1 - ||X̂ - X||²_F / ||X||²_F (uncentred, like the PCA limit).
    """
    sse, sxx, sx, shh, sh, scos, n_tok, n_el = s.tolist()
    var_x = sxx / n_el - (sx / n_el) ** 2
    var_h = shh / n_el - (sh / n_el) ** 2
    return {
        "mse": sse / n_el,
        "cosine_similarity": scos / n_tok,
        "relative_error": (sse / sxx) ** 0.5,
        "variance_ratio": var_h / var_x,
        "explained_variance": 1.0 - sse / sxx,
    }


def orthonormality_error(weight: torch.Tensor) -> float:
    """||W Wᵀ - I||_F / sqrt(D'): 0 when W's rows are orthonormal, i.e. when WᵀW is an orthogonal
    projection and distances in the compressed space equal distances of the reconstructions
    (what phase 2's D'-space MSE relies on)."""
    w = weight.detach().double()
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return float(torch.linalg.matrix_norm(w @ w.T - eye) / w.shape[0] ** 0.5)


@torch.no_grad()
def orthonormalize_(weight: torch.Tensor) -> None:
    """Replace W by the matrix with orthonormal rows that spans the same row space (a QR retraction
    onto the Stiefel manifold): Wᵀ = QR, W <- Qᵀ, with R's diagonal made positive so that a W whose
    rows are already orthonormal stays as it is. Applied after every optimizer step, it keeps WᵀW
    an orthogonal projection while the optimizer moves the subspace."""
    q, r = torch.linalg.qr(weight.T.double())
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=q.dtype, device=q.device))
    weight.copy_(q.T.to(weight.dtype))


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the weights, without the prefixes DDP (`module.`) or torch.compile (`_orig_mod.`) add."""
    return {k.replace("_orig_mod.", "").replace("module.", ""): v.detach().cpu().clone()
            for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                    best_loss: float, best_metrics: dict[str, float]) -> None:
    """Plain tensors and plain dicts only, written to a temporary file and renamed into place,
    so a crash mid-write never leaves a corrupt file or loses the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"compressor": state, "config": dict(config), "best_loss": float(best_loss),
               "best_metrics": {k: float(v) for k, v in best_metrics.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path, map_location: str = "cpu",
                    d_model: int | None = None, d_compressed: int | None = None) -> dict[str, Any]:
    """Load with weights_only=True (a checkpoint is data, never code) and check its shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): is it a trm_ray checkpoint?") from None
    shape = tuple(ckpt["compressor"]["weight"].shape)
    want = (d_compressed or shape[0], d_model or shape[1])
    if shape != want:
        raise UserError(
            f"checkpoint {path} holds a compressor of shape D'xD = {shape[0]}x{shape[1]}, "
            f"but this run needs {want[0]}x{want[1]}"
        )
    return ckpt
