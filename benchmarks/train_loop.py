"""Training-loop overhead: tokens/s of trm_ray's Ray Train worker loop vs a bare PyTorch loop doing the same steps.

Both train a DimensionCompressor(D, D') with AdamW, trm_ray.loop.get_lr's schedule,
gradient clipping and batches of batch_size * max_seq_length token rows, on the same
synthetic bf16 shards, on one thread (Ray gives a 1-CPU worker OMP_NUM_THREADS=1). The Ray
side is the real thing: trm_ray.sweep.datasets (materialized, as in a sweep) feeding
trm_ray.train.make_trainer. The bare loop holds the train rows decoded in memory, so the
ratio prices everything Ray Train and Ray Data add. Figures are the steady state: the
median over the epochs after the first, which pays the start-up. Before the fit,
trm_ray.spectrum makes its one-off pass over the shards (the loop reports pca_efficiency);
on 2 cores at D=2048 that pass is a third to a half of the run, and is not in the figures.

    python -m benchmarks.train_loop            # D=2048, D'=256, 131,072 tokens: 3-5 minutes on 2 cores
    python -m benchmarks.train_loop --smoke    # tiny sizes, seconds: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from ray.train import UserCallback

from benchmarks.common import bare_trainer, machine, print_ratio, read_train_rows, write_synthetic_shards
from trm_ray import spectrum
from trm_ray.cluster import connect
from trm_ray.config import Config, make_config
from trm_ray.shards import split_counts
from trm_ray.sweep import datasets, trial_spec
from trm_ray.loop import one_thread
from trm_ray.train import make_trainer

FULL = dict(d_model=2048, d_compressed=256, num_samples=256, max_seq_length=512, batch_size=8, num_epochs=4,
            docs_per_shard=256)
# Compiling would take longer than the whole smoke run.
SMOKE = dict(d_model=64, d_compressed=16, num_samples=48, max_seq_length=32, batch_size=4, num_epochs=2,
             docs_per_shard=16, torch_compile=False)


class EpochLog(UserCallback):
    """Appends every report to a JSON-lines file. The callback runs in the Train controller's
    process, and Result.metrics_dataframe keeps only reports whose checkpoint was kept."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


def ray_rates(cfg: Config, manifest: dict[str, Any], limit: dict[str, Any], work_dir: str) -> tuple[list[float], float]:
    """Per-epoch tokens/s that train_loop_per_worker reported, and the wall time of the whole fit()."""
    counts = split_counts(manifest, cfg.val_fraction, cfg.seed)
    config = trial_spec(cfg, manifest, counts, limit, os.path.join(work_dir, "ray_results")).flat()
    log = os.path.join(work_dir, "epochs.jsonl")
    t0 = time.perf_counter()
    train, val = datasets(cfg, manifest)
    result = make_trainer(config, train, val, callbacks=[EpochLog(log)]).fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    with open(log) as f:
        return [json.loads(line)["tokens_per_s"] for line in f], wall


def bare_rates(cfg: Config, x: torch.Tensor) -> list[float]:
    """Per-epoch tokens/s of the same steps on rows already in memory, without Ray, on one thread."""
    rows = cfg.batch_size * cfg.max_seq_length
    rates = []
    with one_thread():
        _, step = bare_trainer(cfg, x.shape[1], cfg.d_compressed, math.ceil(len(x) / rows))
        for _ in range(cfg.num_epochs):
            t0 = time.perf_counter()
            for batch in torch.randperm(len(x)).split(rows):
                step(x[batch])
            rates.append(len(x) / (time.perf_counter() - t0))
    return rates


def steady(rates: list[float]) -> float:
    """Median over the epochs after the first: the first pays process and pipeline start-up."""
    return statistics.median(rates[1:])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    sizes = SMOKE if parser.parse_args(argv).smoke else FULL
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = make_config({k: v for k, v in sizes.items() if k != "d_model"} | dict(
            model_name="synthetic", storage_dtype="bfloat16", output_dir=work_dir, num_cpus=8, use_wandb=False))
        connect(cfg)
        manifest = write_synthetic_shards(cfg, sizes["d_model"])
        t0 = time.perf_counter()
        limit = spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed)  # the loop reports pca_efficiency
        spectrum_s = time.perf_counter() - t0
        ray_tps, wall = ray_rates(cfg, manifest, limit, work_dir)
        x = read_train_rows(cfg, manifest)
        bare_tps = bare_rates(cfg, x)
    print(f"train_loop: D={sizes['d_model']}, D'={cfg.d_compressed}, {len(x):,} train tokens an epoch, "
          f"{cfg.num_epochs} epochs, batches of {cfg.batch_size * cfg.max_seq_length:,} rows, bf16 shards")
    print(machine(load))
    print(f"ray loop tokens/s per epoch:  {', '.join(f'{r:,.0f}' for r in ray_tps)} "
          f"(whole fit() {wall:.1f}s, after trm_ray.spectrum's one-off pass of {spectrum_s:.1f}s)")
    print(f"bare loop tokens/s per epoch: {', '.join(f'{r:,.0f}' for r in bare_tps)}")
    name = "ray_loop/bare_loop"
    return {name: print_ratio(name, steady(ray_tps), steady(bare_tps), "tokens/s, median of epochs 2+")}


if __name__ == "__main__":
    main()
