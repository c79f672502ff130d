"""Quality vs the limit on LM-like data: pca_efficiency of trm_ray's trained compressors on
hidden states with a heavy-tailed spectrum.

The quickstart's model is tiny and its spectrum short; a 3B model's last layer has a
power-law spectrum over D dimensions, a few outlier feature dimensions well above the
rest, and heavy-tailed values. These shards have all three: latent values drawn from a
Student t (4 degrees of freedom, so kurtosis far above a Gaussian's), per-direction
scales falling as i^-0.6 (variances as i^-1.2) along a random rotation, and two outlier
dimensions with 4x the largest scale. Each D' is trained by trm_ray's own TorchTrainer
(`make_trainer`, the sweep's trial, all D' in one), and compared with the PCA limit trm_ray.spectrum computes.

With `--real`, the same on real hidden states: the last layer of a pretrained causal LM
(SmolLM2-135M-Instruct, D=576, see benchmarks.real_model) over ~100k tokens of real English,
extracted by trm_ray.extract, trained with trm_ray's defaults at D' from 8 to D/2 = 288
(`--seed_settings`: the seed's orthogonal start, free rows and lr 1e-3 instead).

    python -m benchmarks.quality            # D=512, 98k tokens, D' in 16/64/128: ~5 minutes on 2 cores
    python -m benchmarks.quality --real     # SmolLM2-135M, 100k tokens, D' 8..288 (extraction cached)
    python -m benchmarks.quality --smoke    # tiny sizes: checks the script, not the quality
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import machine, print_ratio, write_synthetic_shards
from trm_ray import spectrum
from trm_ray.cluster import connect
from trm_ray.compressor import read_checkpoint
from trm_ray.config import Config, make_config
from trm_ray.shards import split_counts
from trm_ray.sweep import datasets, trial_spec
from trm_ray.names import CHECKPOINT_FILE, width_key
from trm_ray.train import make_trainer

FULL = dict(d_model=512, sweep_d_values=[16, 64, 128, 256], num_samples=384, max_seq_length=256, docs_per_shard=64,
            batch_size=4)
SMOKE = dict(d_model=64, sweep_d_values=[8, 16], num_samples=48, max_seq_length=32, docs_per_shard=16,
             batch_size=4, num_epochs=2, learning_rate=0.01)


def heavy_tailed_rows(gen: torch.Generator, n: int, hidden_size: int) -> torch.Tensor:
    """Student-t latents, power-law scales along a fixed random rotation, two outlier dimensions."""
    rotation, _ = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=torch.Generator().manual_seed(0)))
    scale = torch.arange(1, hidden_size + 1, dtype=torch.float32) ** -0.6
    chi2 = (torch.randn(n, hidden_size, 4, generator=gen) ** 2).sum(-1)
    t = torch.randn(n, hidden_size, generator=gen) / (chi2 / 4).sqrt() / 2 ** 0.5  # Student t, 4 dof, unit variance
    x = (t * scale) @ rotation.T
    x[:, :2] += 4 * torch.randn(n, 2, generator=gen)
    return x


# Real text through a real LM: only the model, the data and the D' grid are given, the rest are trm_ray's defaults
# (torch.compile off: on 2 CPU cores it costs more than the training; it does not change the result).
REAL = dict(num_samples=400, max_seq_length=256, docs_per_shard=25, sweep_d_values=[8, 16, 32, 64, 128, 288])
SEED_SETTINGS = dict(init="orthogonal", orthonormal=False, learning_rate=1e-3)


def train_each(cfg: Config, manifest: dict[str, Any], storage: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every D' of `cfg.sweep_d_values` trained by trm_ray's own TorchTrainer (one trial, the sweep's); (the PCA
    limit, one row per D', each with its best checkpoint's metrics and the last epoch's)."""
    limit = spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed)
    counts = split_counts(manifest, cfg.val_fraction, cfg.seed)
    train, val = datasets(cfg, manifest)
    t0 = time.perf_counter()
    result = make_trainer(trial_spec(cfg, manifest, counts, limit, storage).flat(), train, val).fit()
    if result.error is not None:
        raise result.error
    wall = time.perf_counter() - t0
    rows = []
    for d in cfg.sweep_d_values:
        best = read_checkpoint(f"{result.checkpoint.path}/d{d}/{CHECKPOINT_FILE}")["best_metrics"]
        last = {k: result.metrics_dataframe[width_key(d, k)].dropna().iloc[-1] for k in ("pca_mse", "mse", "cosine_similarity",
                                                                                         "epochs_trained")}
        rows.append({"d": d, "train_tokens": counts["train_tokens"], "best": best, "last": last, "wall_s": wall})
    return limit, rows


def real(seed_settings: bool) -> dict[str, float]:
    """The defaults (or the seed's settings) on SmolLM2-135M's last-layer hidden states of real English."""
    from benchmarks.real_model import CACHE, english_corpus, pretrained_lm_dir
    from trm_ray.extract import extract

    load, started = os.getloadavg()[0], time.perf_counter()
    work_dir = str(CACHE / "quality_real")  # the extraction is kept: a rerun trains only
    cfg = make_config(REAL | (SEED_SETTINGS if seed_settings else {}) | dict(
        model_name=pretrained_lm_dir(), dataset=english_corpus(os.path.join(work_dir, "corpus.jsonl"), REAL["num_samples"]),
        output_dir=work_dir, sweep=True, num_cpus=8, use_wandb=False, torch_compile=False))
    connect(cfg)
    manifest = extract(cfg)
    with tempfile.TemporaryDirectory() as storage:
        limit, rows = train_each(cfg, manifest, storage)
    print(f"quality --real: {os.path.basename(cfg.model_name)} last layer, D={manifest['hidden_size']}, "
          f"{rows[0]['train_tokens']:,} train tokens of English; init {cfg.init}, orthonormal {cfg.orthonormal}, "
          f"lr {cfg.learning_rate:g}, at most {cfg.num_epochs} epochs; {time.perf_counter() - started:.0f}s")
    print(machine(load))
    print(f"{'D_prime':>8} {'pca_efficiency':>15} {'orth_err':>9} {'cosine':>8} {'pca_cosine':>11} {'best_epoch':>11} "
          f"{'epochs':>7} {'wall_s':>7}")
    for r in rows:
        print(f"{r['d']:>8} {r['last']['pca_mse'] / r['best']['mse']:>15.4f} {r['best']['orthonormality_error']:>9.2g} "
              f"{r['best']['cosine_similarity']:>8.4f} {limit['pca_cosine_similarity'][r['d']]:>11.4f} "
              f"{int(r['best']['epoch']):>11} {int(r['last']['epochs_trained']):>7} {r['wall_s']:>7.0f}")
    return {f"pca_efficiency_d{r['d']}": print_ratio(f"pca_efficiency_d{r['d']}", r["last"]["pca_mse"], r["best"]["mse"],
                                                     "mse, PCA limit / best checkpoint") for r in rows}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the quality")
    parser.add_argument("--real", action="store_true", help="real hidden states of a pretrained LM instead of synthetic ones")
    parser.add_argument("--seed_settings", action="store_true", help="with --real: the seed's training settings, not the defaults")
    args = parser.parse_args(argv)
    if args.real:
        return real(args.seed_settings)
    sizes = SMOKE if args.smoke else FULL
    load = os.getloadavg()[0]
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = make_config({k: v for k, v in sizes.items() if k != "d_model"} | dict(
            model_name="synthetic", storage_dtype="bfloat16", output_dir=work_dir, num_cpus=8, use_wandb=False,
            sweep=True, torch_compile=False))
        connect(cfg)
        manifest = write_synthetic_shards(cfg, sizes["d_model"], heavy_tailed_rows)
        limit, rows = train_each(cfg, manifest, os.path.join(work_dir, "ray_results"))
    print(f"quality: D={sizes['d_model']}, {rows[0]['train_tokens']:,} train tokens, heavy-tailed spectrum, "
          f"{cfg.num_epochs} epochs, init {cfg.init}, lr {cfg.learning_rate:g}; {time.perf_counter() - started:.0f}s")
    print(machine(load))
    print(f"{'D_prime':>8} {'pca_explained_var':>18} {'pca_cosine':>11} {'cosine':>8} {'pca_mse':>10} {'mse':>10}")
    for r in rows:
        d, m = r["d"], r["last"]
        print(f"{d:>8} {limit['pca_explained_variance'][d]:>18.4f} {limit['pca_cosine_similarity'][d]:>11.4f} "
              f"{m['cosine_similarity']:>8.4f} {m['pca_mse']:>10.4g} {m['mse']:>10.4g}")
    return {f"pca_efficiency_d{r['d']}": print_ratio(f"pca_efficiency_d{r['d']}", r["last"]["pca_mse"], r["last"]["mse"],
                                                     "mse, PCA limit / trained") for r in rows}


if __name__ == "__main__":
    main()
