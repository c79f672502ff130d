"""The references computed once per shard set and split, stored beside the shards and read by every trial
and sweep: the spectrum (PCA's limit and eigenvectors), the Fisher start, the PCA reconstruction's KL.

Each records the manifest's key (`manifest_key`) and its split, so shards extracted again (another model,
corpus or setting) never reuse a stale reference: `stored` and `stored_json` answer None for them, and the
pass that made the reference makes it again. `store` writes one: its tensors (.pt), then its summary (.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Any

import torch

from trm_ray.config import UserError
from trm_ray.files import exists, read_bytes, read_json, write_bytes, write_json
from trm_ray.names import spectrum_files
from trm_ray.pca import fisher_basis, quadratic_kl
from trm_ray.shards import read_manifest


def manifest_key(shards_dir: str) -> str:
    """A digest of the shards' manifest: what every file derived from the shards (spectrum, Fisher
    start, PCA KL) records, so that shards extracted again make them be computed again."""
    return hashlib.sha256(json.dumps(read_manifest(shards_dir), sort_keys=True).encode()).hexdigest()[:16]


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

def stored_json(shards_dir: str, val_fraction: float, seed: int, name: str, **key: Any) -> dict[str, Any] | None:
    """The .json stored for this split under `name`, or None when there is none or it was computed from other
    shards than these (or with other `key` values, e.g. another model's head)."""
    found = read_json(spectrum_files(shards_dir, val_fraction, seed, name)[0])
    want = {"manifest": manifest_key(shards_dir), **key}
    return found if found is not None and all(found.get(k) == v for k, v in want.items()) else None


def store(shards_dir: str, val_fraction: float, seed: int, name: str, tensors: dict[str, Any] | None = None,
          summary: dict[str, Any] | None = None) -> None:
    """Store `tensors` (.pt, with the split) and then `summary` (.json) under `name`, each with the manifest's key:
    the .json last, so a summary never stands without the tensors it was written with."""
    pt_path = spectrum_files(shards_dir, val_fraction, seed, name)[1]
    key = {"manifest": manifest_key(shards_dir)}
    if tensors is not None:
        buf = io.BytesIO()
        torch.save({**tensors, "split": {"val_fraction": val_fraction, "seed": seed}, **key}, buf)
        write_bytes(pt_path, buf.getvalue())
    if summary is not None:
        write_json(spectrum_files(shards_dir, val_fraction, seed, name)[0], {**summary, **key})


def eigenvectors(shards_dir: str, val_fraction: float, seed: int, name: str = "spectrum") -> torch.Tensor:
    """The eigenvectors of this split's training second moment (columns, largest eigenvalue first);
    name="fisher": those of the same PCA in the LM head's Fisher metric (`downstream.fisher_start`)."""
    found = stored(shards_dir, val_fraction, seed, name)
    if found is None:
        raise UserError(f"{spectrum_files(shards_dir, val_fraction, seed, name)[1]} is missing or was computed from other "
                        "shards: a sweep computes it again (and python -m trm_ray.spectrum the spectrum)")
    return found["eigenvectors"]


def training_mean(shards_dir: str, val_fraction: float, seed: int) -> torch.Tensor:
    """The training rows' mean [D] (float64, from the stored spectrum): what the centred metrics are centred about."""
    return torch.tensor(read_json(spectrum_files(shards_dir, val_fraction, seed)[0])["mean"], dtype=torch.float64)


def store_fisher_start(shards_dir: str, val_fraction: float, seed: int, fisher: torch.Tensor, sigma: torch.Tensor,
                       pca: torch.Tensor, tokens: int) -> None:
    """Write `fisher_basis(fisher, sigma)` and the quadratic KL of it and of `pca` at every D'."""
    basis = fisher_basis(fisher, sigma)
    scores = {"fisher": quadratic_kl(fisher, sigma, basis).cpu(), "pca": quadratic_kl(fisher, sigma, pca).cpu()}
    store(shards_dir, val_fraction, seed, "fisher", {"eigenvectors": basis.cpu(), "quadratic_kl": scores, "tokens": tokens})


def start_basis(shards_dir: str, val_fraction: float, seed: int, init: str, d: int) -> torch.Tensor:
    """[D, d]: the start of `--init pca` (the top-d eigenvectors), or of `--init fisher`: the Fisher
    basis's top d where its quadratic KL at this d is at most PCA's, else PCA's, so the Fisher start
    is never worse than PCA's under the quadratic model of the training rows' KL."""
    if init == "fisher":
        found = stored(shards_dir, val_fraction, seed, "fisher")
        if found is None or "quadratic_kl" not in found:
            raise UserError(f"{spectrum_files(shards_dir, val_fraction, seed, 'fisher')[1]} is missing or was computed "
                            "from other shards: a KL sweep with --init fisher computes it again")
        if found["quadratic_kl"]["fisher"][d] <= found["quadratic_kl"]["pca"][d]:
            return found["eigenvectors"][:, :d]
    return eigenvectors(shards_dir, val_fraction, seed)[:, :d]


def start_path(output_dir: str) -> str:
    """Where a phase-2 sweep keeps the start of each D' for its trials."""
    return posixpath.join(output_dir, "phase2_start_stage1b.pt")


def start_weight(output_dir: str, d: int) -> torch.Tensor:
    """The start `references_and_start` chose for width d ([d, D])."""
    return torch.load(io.BytesIO(read_bytes(start_path(output_dir))), weights_only=True)[d]
