"""The weight-tied dimension compressor, its reconstruction metrics, and its checkpoint file.

[.., D] -> W x -> [.., D'] -> Wᵀ z -> [.., D]. One D'xD matrix does both directions, so the
model has D*D' parameters and its optimum under MSE is a projection onto a principal
subspace (see DESIGN.md). Metrics are kept as float64 sums so that they can be added up
across batches and DDP ranks and give exactly the token-weighted value over the whole set.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch
from torch import nn

from trm_ray.config import UserError
from trm_ray.files import atomic_output

class DimensionCompressor(nn.Module):
    """LLM-TRM's own layout (`compress = nn.Linear(D, D', bias=False)`, so the state dict holds
    `compress.weight`): phase 2 and the seed's stage 1b load trm_ray's state dict as it is."""

    def __init__(self, d_model: int, d_compressed: int):
        super().__init__()
        if not 0 < d_compressed < d_model:
            raise UserError(
                f"d_compressed (D') must be between 1 and D-1 = {d_model - 1} for this model's hidden size "
                f"D = {d_model}, got {d_compressed}"
            )
        self.d_model = d_model
        self.d_compressed = d_compressed
        self.compress = nn.Linear(d_model, d_compressed, bias=False)  # [.., D] -> [.., D']
        # Orthonormal rows make Wᵀ W a projection from step 0: the reconstruction starts
        # sensible and the tied decoder starts as the encoder's exact inverse on its span.
        nn.init.orthogonal_(self.compress.weight)

    @property
    def weight(self) -> nn.Parameter:
        """W, D'xD: the one matrix that compresses (W x) and, transposed, decompresses (Wᵀ z)."""
        return self.compress.weight

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decompress(self.compress(x))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> "DimensionCompressor":
        ckpt = load_checkpoint(path, map_location)
        weight = ckpt["compressor"][WEIGHT_KEY]
        model = cls(weight.shape[1], weight.shape[0])
        model.load_state_dict(ckpt["compressor"])
        return model


RECONSTRUCTION_SUMS = 10  # the terms `reconstruction_sums` returns
TOKENS = 6  # the one of them that counts the rows


def reconstruction_sums(x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Float64 sums over a batch of token rows [N, D], from which `metrics_from_sums` derives every metric;
    `mean` [D] is the training rows' mean, about which the centred metrics are taken."""
    x = x.double()
    x_hat = x_hat.double()
    mean = mean.to(x)
    cos = nn.functional.cosine_similarity(x_hat, x, dim=-1, eps=1e-12)
    centred_cos = nn.functional.cosine_similarity(x_hat - mean, x - mean, dim=-1, eps=1e-12)
    return torch.stack([
        ((x_hat - x) ** 2).sum(),  # squared error
        (x ** 2).sum(),
        x.sum(),
        (x_hat ** 2).sum(),
        x_hat.sum(),
        cos.sum(),
        torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),  # tokens
        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),  # elements
        ((x - mean) ** 2).sum(),
        centred_cos.sum(),
    ])


def metrics_from_sums(s: torch.Tensor) -> dict[str, float]:
    """Token-weighted metrics over everything summed into `s`.

    mse: mean over elements; cosine_similarity: mean over tokens; relative_error:
    ||X̂ - X||_F / ||X||_F; variance_ratio: Var(X̂) / Var(X) over all elements;
    explained_variance: 1 - ||X̂ - X||²_F / ||X||²_F (uncentred, like the PCA limit);
    centred_explained_variance: 1 - ||X̂ - X||²_F / ||X - μ||²_F and centred_cosine_similarity:
    the mean cos(x̂ - μ, x - μ), μ the training mean. A large, nearly constant direction of the
    residual stream is most of ||x||: it flatters the uncentred two, not these.
    """
    sse, sxx, sx, shh, sh, scos, n_tok, n_el, sxc, sccos = s.tolist()
    var_x = sxx / n_el - (sx / n_el) ** 2
    var_h = shh / n_el - (sh / n_el) ** 2
    return {
        "mse": sse / n_el,
        "cosine_similarity": scos / n_tok,
        "relative_error": (sse / sxx) ** 0.5,
        "variance_ratio": var_h / var_x,
        "explained_variance": 1.0 - sse / sxx,
        "centred_explained_variance": 1.0 - sse / sxc,
        "centred_cosine_similarity": sccos / n_tok,
    }


def orthonormality_error(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """||W Wᵀ - I||_F / sqrt(D'): 0 when W's rows are orthonormal, i.e. when WᵀW is an orthogonal
    projection and distances in the compressed space equal distances of the reconstructions
    (what phase 2's D'-space MSE relies on). Reported in float64; the retraction's check in float32."""
    w = weight.detach().to(dtype)
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return float(torch.linalg.matrix_norm(w @ w.T - eye) / w.shape[0] ** 0.5)


ORTHONORMALITY_TOLERANCE = 1e-6  # the retraction's float32 QR stays below it (2e-7 to 4e-7 at D=2048, D' 256-1024)


def _orthonormal_rows(weight: torch.Tensor) -> torch.Tensor:
    """Qᵀ of Wᵀ = QR, R's diagonal made positive so that rows already orthonormal stay as they are."""
    q, r = torch.linalg.qr(weight.T)
    sign = torch.sign(torch.diagonal(r))
    return (q * sign.where(sign != 0, torch.ones_like(sign))).T


@torch.no_grad()
def orthonormalize_(weight: torch.Tensor) -> None:
    """Replace W by the matrix with orthonormal rows that spans the same row space (a QR retraction
    onto the Stiefel manifold). Applied after every optimizer step, it keeps WᵀW an orthogonal
    projection while the optimizer moves the subspace. The QR runs in float32, a step's own precision
    (float64 runs at 1/64 rate on many GPUs and cost more than the step): again in float64 only when
    its rows are more than ORTHONORMALITY_TOLERANCE off orthonormal."""
    q = _orthonormal_rows(weight.float())
    if orthonormality_error(q, torch.float32) > ORTHONORMALITY_TOLERANCE:
        q = _orthonormal_rows(weight.double())
    weight.copy_(q.to(weight.dtype))


def tangent_part(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """z's part tangent at W (rows orthonormal) to the manifold of matrices with orthonormal rows,
    z - sym(z Wᵀ) W: what is left once the directions that only rescale and shear W's rows (which the
    retraction undoes) are taken out."""
    w = weight.detach()
    zw = z @ w.T
    return z - ((zw + zw.T) / 2) @ w


@torch.no_grad()
def retract_(weight: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """After an Adam step on W: its rows put back onto an orthonormal set, and Adam's momentum carried to the
    new point's tangent space (vector transport by projection)."""
    orthonormalize_(weight)
    momentum = optimizer.state[weight]["exp_avg"]
    momentum.copy_(tangent_part(weight, momentum))


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the weights, without the prefixes DDP (`module.`) or torch.compile (`_orig_mod.`) add."""
    return {k.replace("_orig_mod.", "").replace("module.", ""): v.detach().cpu().clone()
            for k, v in model.state_dict().items()}


WEIGHT_KEY = "compress.weight"  # W in the state dict, named as LLM-TRM's DimensionCompressor names it


class Phase1Config:
    """A checkpoint's `config`: plain data that answers attribute access as LLM-TRM's `Phase1Config` does.

    Phase 2 (`TRMSequenceTrainer._load_compressor`) and the seed's stage 1b read `config.hidden_size`
    and `config.d_compressed`, push_to_hub.py also `config.compression_ratio`, after binding their own
    dataclass to `__main__.Phase1Config` and loading with weights_only=False: the name this class is
    pickled under, so there the config becomes their dataclass, filled with these fields. trm_ray
    itself loads with weights_only=True, this class allow-listed under that name: a checkpoint
    stays data (strings, numbers, lists, dicts), never code, on both sides."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    @property
    def compression_ratio(self) -> float:
        return self.hidden_size / self.d_compressed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The name LLM-TRM's loaders bind their config class to before they unpickle a phase-1 checkpoint.
Phase1Config.__module__, Phase1Config.__qualname__ = "__main__", "Phase1Config"
CONFIG_GLOBAL = "__main__.Phase1Config"


_MISSING = object()


@contextlib.contextmanager
def _config_pickled_as_theirs() -> Iterator[None]:
    """pickle writes a class by its module and name after checking that they resolve to it: bind
    `__main__.Phase1Config` to this class while a checkpoint is written, then put back what was there."""
    main = sys.modules["__main__"]
    before = main.__dict__.get("Phase1Config", _MISSING)
    main.Phase1Config = Phase1Config
    try:
        yield
    finally:
        if before is _MISSING:
            del main.Phase1Config
        else:
            main.Phase1Config = before


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                    best_loss: float, best_metrics: dict[str, float]) -> None:
    """The seed's layout (`compressor`, `config`, `best_loss`, `best_metrics`) with LLM-TRM's key names,
    written to a temporary file and renamed into place, so a crash mid-write never leaves a corrupt
    file or loses the previous one. `config` holds the run's settings, plus `hidden_size` and
    `d_compressed` read off W itself, so they always describe the weights beside them."""
    d_compressed, hidden_size = state[WEIGHT_KEY].shape
    payload = {"compressor": state,
               "config": Phase1Config(**{**config, "hidden_size": int(hidden_size), "d_compressed": int(d_compressed)}),
               "best_loss": float(best_loss), "best_metrics": {k: float(v) for k, v in best_metrics.items()}}
    with atomic_output(str(path)) as (_, tmp), _config_pickled_as_theirs():
        torch.save(payload, tmp)


def read_checkpoint(source: str | Path | BinaryIO, map_location: str = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True, trm_ray's config class allowed. A checkpoint from before
    trm_ray took LLM-TRM's layout (W under `weight`, the config a dict) comes back in today's layout."""
    with torch.serialization.safe_globals([(Phase1Config, CONFIG_GLOBAL)]):
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    state = ckpt["compressor"]
    ckpt["compressor"] = {WEIGHT_KEY if k == "weight" else k.replace("_orig_mod.", ""): v for k, v in state.items()}
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = Phase1Config(**ckpt["config"])
    return ckpt


def load_checkpoint(path: str | Path, map_location: str = "cpu",
                    d_model: int | None = None, d_compressed: int | None = None) -> dict[str, Any]:
    """Load a trm_ray checkpoint as data (weights_only=True) and check its shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = read_checkpoint(path, map_location)
        shape = tuple(ckpt["compressor"][WEIGHT_KEY].shape)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): is it a trm_ray checkpoint?") from None
    want = (d_compressed or shape[0], d_model or shape[1])
    if shape != want:
        raise UserError(
            f"checkpoint {path} holds a compressor of shape D'xD = {shape[0]}x{shape[1]}, "
            f"but this run needs {want[0]}x{want[1]}"
        )
    return ckpt
