"""Quality vs the limit on LM-like data: pca_efficiency of trm_ray's trained compressors on
hidden states with a heavy-tailed spectrum.

The quickstart's model is tiny and its spectrum short; a 3B model's last layer has a
power-law spectrum over D dimensions, a few outlier feature dimensions well above the
rest, and heavy-tailed values. These shards have all three: latent values drawn from a
Student t (4 degrees of freedom, so kurtosis far above a Gaussian's), per-direction
scales falling as i^-0.6 (variances as i^-1.2) along a random rotation, and two outlier
dimensions with 4x the largest scale. Each D' is trained by trm_ray's own TorchTrainer
(`make_trainer`, the sweep's trial), and compared with the PCA limit trm_ray.spectrum computes.

    python -m benchmarks.quality            # D=512, 98k tokens, D' in 16/64/128: ~5 minutes on 2 cores
    python -m benchmarks.quality --smoke    # tiny sizes: checks the script, not the quality
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch

from benchmarks.common import machine, print_ratio, write_synthetic_shards
from trm_ray import spectrum
from trm_ray.cli import connect
from trm_ray.config import make_config
from trm_ray.shards import split_counts
from trm_ray.sweep import datasets, trial_config_for
from trm_ray.train import make_trainer

FULL = dict(d_model=512, sweep_d_values=[16, 64, 128], num_samples=384, max_seq_length=256, docs_per_shard=64,
            batch_size=4, num_epochs=10, learning_rate=0.05)
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the quality")
    sizes = SMOKE if parser.parse_args(argv).smoke else FULL
    load = os.getloadavg()[0]
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = make_config({k: v for k, v in sizes.items() if k != "d_model"} | dict(
            model_name="synthetic", storage_dtype="bfloat16", output_dir=work_dir, num_cpus=8, use_wandb=False,
            sweep=True, torch_compile=False, early_stopping=False))
        connect(cfg)
        manifest = write_synthetic_shards(cfg, sizes["d_model"], heavy_tailed_rows)
        limit = spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed)
        counts = split_counts(manifest, cfg.val_fraction, cfg.seed)
        train, val = datasets(cfg, manifest)
        for d in cfg.sweep_d_values:
            config = trial_config_for(dataclasses.replace(cfg, d_compressed=d), manifest, counts, limit, os.path.join(work_dir, "ray_results"))
            result = make_trainer(config, train, val).fit()
            if result.error is not None:
                raise result.error
            rows.append((d, limit["explained_variance"][d], result.metrics))
    print(f"quality: D={sizes['d_model']}, {counts['train_tokens']:,} train tokens, heavy-tailed spectrum, "
          f"{cfg.num_epochs} epochs, lr {cfg.learning_rate:g}; {time.perf_counter() - started:.0f}s")
    print(machine(load))
    print(f"{'D_prime':>8} {'pca_explained_var':>18} {'pca_cosine':>11} {'cosine':>8} {'pca_mse':>10} {'mse':>10}")
    for d, explained, m in rows:
        print(f"{d:>8} {explained:>18.4f} {limit['pca_cosine_similarity'][d]:>11.4f} {m['cosine_similarity']:>8.4f} "
              f"{m['pca_mse']:>10.4g} {m['mse']:>10.4g}")
    return {f"pca_efficiency_d{d}": print_ratio(f"pca_efficiency_d{d}", m["pca_mse"], m["mse"], "mse, PCA limit / trained")
            for d, _, m in rows}


if __name__ == "__main__":
    main()
