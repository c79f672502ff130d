"""Per-region validation scores of stage 1b: the exported compressors on each kind of state the shards hold.

Phase 2 reads two kinds of state: the context it compresses token by token, and the one state
at the end of the closing marker, which it decompresses into the LM head for the first answer
token. A compressor's overall metrics weigh them by their counts (hundreds of context tokens to
one closing state a conversation), so each region is scored apart: its reconstruction (mse,
cosine, and pca_efficiency against the region's own PCA limit, `spectrum.load_or_compute` on
that region's rows), and at the closing state what the LM head makes of the reconstruction
(next-token KL and top-1 agreement with the original state, `kl.damage_sums`),
beside the same for the closing region's own PCA. Runs once per sweep on the exported
checkpoints, over the whole validation set split into one Ray task per device (GPUs with --use_gpu).
"""

from __future__ import annotations

from typing import Any

import torch

from trm_ray import spectrum
from trm_ray.compressor import TOKENS, DimensionCompressor, metrics_from_sums, reconstruction_sums
from trm_ray.cluster import add_up, on_every_device
from trm_ray.hidden import decode_hidden
from trm_ray.kl import damage_metrics, damage_sums
from trm_ray.references import eigenvectors, training_mean
from trm_ray.model import check_lm_head, load_lm_head
from trm_ray.shards import read_manifest, split_tables
from trm_ray.text import KEPT_REGIONS


def scored_regions(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The regions a shard set keeps, when it keeps more than one (one region's scores are the overall ones)."""
    kept = KEPT_REGIONS[manifest["keep_tokens"]] if manifest.get("regions") else ()
    return kept if len(kept) > 1 else ()


def measure_regions(use_gpu: bool, model_name: str, shards_dir: str, val_fraction: float, seed: int,
                    checkpoints: dict[int, str], pca_mse: dict[str, list[float]], with_head: bool) -> dict[int, dict[str, float]]:
    """For each D': `<region>_mse`, `_cosine_similarity`, `_pca_mse`, `_pca_efficiency`, `_tokens` of every
    scored region's validation rows; with `with_head` (a last-layer shard set of a model with an LM head), `close_downstream_kl`,
    `close_top1_agreement` and PCA's `close_pca_downstream_kl`, `close_pca_top1_agreement`: `region_sums` split over
    every device of the cluster (`on_every_device`), summed."""
    parts = on_every_device(use_gpu, len(read_manifest(shards_dir)["shards"]), region_sums, model_name, shards_dir,
                            val_fraction, seed, checkpoints, with_head)
    sums = add_up(parts)
    out: dict[int, dict[str, float]] = {d: {} for d in checkpoints}
    for key, s in sums.items():
        if key[0] != "recon":
            continue
        _, d, r = key
        m, limit = metrics_from_sums(s), pca_mse[r][d]
        out[d].update({f"{r}_mse": m["mse"], f"{r}_cosine_similarity": m["cosine_similarity"], f"{r}_pca_mse": limit,
                       f"{r}_pca_efficiency": limit / m["mse"], f"{r}_tokens": int(s[TOKENS])})
    n_close = int(sums["close_rows"]) if "close_rows" in sums else 0
    if with_head and n_close:
        for d in checkpoints:
            trained, pca = (damage_metrics(sums[kind, d], n_close, 0) for kind in ("trained", "pca"))
            out[d].update({"close_downstream_kl": trained["kl"], "close_top1_agreement": trained["top1_agreement"],
                           "close_pca_downstream_kl": pca["kl"], "close_pca_top1_agreement": pca["top1_agreement"]})
    return out


@torch.no_grad()
def region_sums(model_name: str, shards_dir: str, val_fraction: float, seed: int, checkpoints: dict[int, str],
                with_head: bool, part: tuple[int, int] = (0, 1)) -> dict[tuple[Any, ...], torch.Tensor]:
    """Over the validation rows of `part` of the shards: ("recon", D', region) -> `reconstruction_sums` of each scored
    region's rows; with `with_head`, ("trained" | "pca", D') -> `damage_sums` at the closing states (the trained
    compressor's, and the closing states' own PCA's) and "close_rows", how many."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_manifest(shards_dir)
    codes = {r: manifest["regions"].index(r) for r in scored_regions(manifest)}
    models = {d: DimensionCompressor.from_checkpoint(path).to(device).eval() for d, path in checkpoints.items()}
    mean = training_mean(shards_dir, val_fraction, seed).to(device)  # the centred metrics', as the rows'
    sums: dict[tuple[Any, ...], torch.Tensor] = {}
    close = []
    for table in split_tables(shards_dir, val_fraction, seed, part=part):
        x = decode_hidden(table["hidden"]).to(device)
        region = torch.tensor(table["region"].to_numpy(), device=device)
        for d, model in models.items():
            x_hat = model(x)
            for r, code in codes.items():
                rows = region == code
                if rows.any():
                    s = reconstruction_sums(x[rows], x_hat[rows], mean)
                    sums["recon", d, r] = s + sums["recon", d, r] if ("recon", d, r) in sums else s
        if "close" in codes:
            close.append(x[region == codes["close"]])
    x = torch.cat(close) if close else torch.empty(0)
    if with_head and len(x):
        lm_head = load_lm_head(model_name, device, torch.float32)
        vecs = eigenvectors(shards_dir, val_fraction, seed, "spectrum-close").float().to(device)
        reconstructions = {("trained", d): model for d, model in models.items()}
        reconstructions |= {("pca", d): lambda h, top=vecs[:, :d]: (h @ top) @ top.T for d in models}
        sums |= damage_sums(lm_head, x, torch.full((len(x),), -1), reconstructions)  # no next token in phase 2's shards
        sums["close_rows"] = torch.tensor(float(len(x)), dtype=torch.float64)
    return {k: v.cpu() for k, v in sums.items()}  # the driver may have no GPU to receive them on


def add_region_metrics(rows: list[dict[str, Any]], cfg: Any, manifest: dict[str, Any]) -> None:
    """Fill the per-region columns of the exported rows (stage 1b shard sets that keep several regions)."""
    regions = scored_regions(manifest)
    if not regions:
        return
    pca_mse = {r: spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed, region=r)["pca_mse"] for r in regions}
    checkpoints = {r["d_compressed"]: r["checkpoint"] for r in rows if "checkpoint" in r}
    found = measure_regions(cfg.use_gpu, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, checkpoints, pca_mse,
                            manifest["layer"] == -1 and check_lm_head(cfg.model_name))
    for r in rows:
        r.update(found.get(r["d_compressed"], {}))


def print_regions(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """The per-region columns as a small table under the sweep's summary."""
    regions = scored_regions(manifest)
    done = [r for r in rows if f"{regions[0]}_mse" in r] if regions else []
    if not done:
        return
    head = f"{'D_prime':>8} {'region':>10} {'tokens':>8} {'mse':>11} {'cosine':>8} {'pca_eff':>8} {'KL':>9} {'pca_KL':>9} {'top1':>6}"
    print("\nvalidation by region (pca_eff against the region's own PCA limit; KL and top1 at the closing state):\n"
          + head + "\n" + "-" * len(head))
    for r in done:
        for g in (g for g in regions if f"{g}_mse" in r):  # a region may have no validation rows
            kl = (f"{r['close_downstream_kl']:>9.3g} {r['close_pca_downstream_kl']:>9.3g} {r['close_top1_agreement']:>6.3f}"
                  if g == "close" and "close_downstream_kl" in r else "")
            print(f"{r['d_compressed']:>8} {g:>10} {r[f'{g}_tokens']:>8,} {r[f'{g}_mse']:>11.4g} "
                  f"{r[f'{g}_cosine_similarity']:>8.4f} {r[f'{g}_pca_efficiency']:>8.4f} {kl}")
