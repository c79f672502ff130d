"""KL objective vs PCA: the next-token KL of the LM head reading a KL-trained compressor's
reconstruction, against the PCA reconstruction of the same D', on validation tokens; the
MSE each pays; and the cost of a KL training step per token against an MSE step. Also the
KL of the closed-form start alone: PCA in the metric of the LM head's Fisher information.

Hidden states are extracted, the PCA limit and the Fisher start computed by trm_ray itself;
the compressor is then trained by trm_ray's own optimisation with its defaults for `--objective kl`
(the Fisher start, AdamW at the KL learning rate, warm-up + cosine decay, clipping, rows kept
orthonormal: `benchmarks.common.bare_trainer`) on rows held in memory, one thread, so that the
KL and MSE steps are timed side by side on the same batches.

    python -m benchmarks.kl_objective            # the quickstart's model (trained briefly on its corpus), D'=8/16/32
    python -m benchmarks.kl_objective --real     # SmolLM2-135M-Instruct on English prose, D=576, D'=32..288
    python -m benchmarks.kl_objective --init pca # the same from the PCA start
    python -m benchmarks.kl_objective --smoke    # tiny sizes: checks the script, not the quality
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import bare_trainer, machine, print_ratio, read_train_rows
from trm_ray.cluster import connect
from trm_ray.compressor import orthonormality_error
from trm_ray.config import Config, make_config
from trm_ray.kl import next_token_damage
from trm_ray.references import start_basis
from trm_ray.hidden import validation_rows
from trm_ray.extract import extract
from trm_ray.kl import LMHead
from trm_ray.model import load_lm_head
from trm_ray.quickstart import write_assets
from trm_ray.references import eigenvectors, training_mean
from trm_ray.sweep import limits
from trm_ray.loop import evaluate, one_thread

QUICKSTART = dict(num_samples=400, max_seq_length=64, docs_per_shard=50, sweep_d_values=[8, 16, 32], batch_size=4,
                  num_epochs=16)
REAL = dict(num_samples=64, max_seq_length=128, docs_per_shard=16, sweep_d_values=[32, 64, 128, 288], batch_size=2,
            num_epochs=10, val_fraction=0.15)
SMOKE = dict(num_samples=48, max_seq_length=32, docs_per_shard=16, sweep_d_values=[8, 16], batch_size=4, num_epochs=1)
COST_STEPS = 3  # steps of each objective timed on the same batches for the cost per token


def inputs(args: argparse.Namespace, work_dir: str) -> tuple[str, str, dict[str, Any]]:
    """(model, corpus, sizes) of the chosen run."""
    if args.real:
        from benchmarks.real_model import english_corpus, pretrained_lm_dir

        return pretrained_lm_dir(), english_corpus(os.path.join(work_dir, "english.jsonl"), REAL["num_samples"]), REAL
    sizes = SMOKE if args.smoke else QUICKSTART
    assets = write_assets(os.path.join(work_dir, "assets"), num_docs=sizes["num_samples"])
    return assets["model"], assets["corpus"], sizes


def train_and_time(cfg: Config, d: int, x: torch.Tensor, lm_head: LMHead) -> tuple[Any, float, float]:
    """The KL-trained compressor of width d, and seconds per training token of a KL step and of an MSE step."""
    rows = cfg.batch_size * cfg.max_seq_length
    steps_per_epoch = math.ceil(len(x) / rows)
    gen = torch.Generator().manual_seed(cfg.seed)
    model, step = bare_trainer(cfg, x.shape[1], d, steps_per_epoch, lm_head)
    for _ in range(cfg.num_epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), rows):
            step(x[order[i:i + rows]])
    batches = [x[i * rows:(i + 1) * rows] for i in range(min(COST_STEPS, steps_per_epoch))]
    seconds = {}
    for objective in ("kl", "mse"):
        _, timed = bare_trainer(dataclasses.replace(cfg, objective=objective, init="pca"), x.shape[1], d, steps_per_epoch, lm_head)
        timed(batches[0])  # first-call costs out of the timing
        t0 = time.perf_counter()
        for b in batches:
            timed(b)
        seconds[objective] = (time.perf_counter() - t0) / sum(len(b) for b in batches)
    return model, seconds["kl"], seconds["mse"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kl_objective", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the quality")
    parser.add_argument("--real", action="store_true", help="a real pretrained LM (SmolLM2-135M-Instruct) on English prose")
    parser.add_argument("--no_orthonormal", action="store_true", help="W free to leave the projections (trm_ray keeps its rows orthonormal)")
    parser.add_argument("--init", choices=["fisher", "pca"], default="fisher", help="where the KL training starts (trm_ray's default: fisher)")
    args = parser.parse_args(argv)
    load, started = os.getloadavg()[0], time.perf_counter()
    rows, costs = [], []
    with tempfile.TemporaryDirectory() as work_dir:
        model_dir, corpus, sizes = inputs(args, work_dir)
        cfg = make_config({**sizes, "model_name": model_dir, "dataset": corpus, "output_dir": work_dir, "num_cpus": 8,
                           "use_wandb": False, "sweep": True, "torch_compile": False, "objective": "kl",
                           "orthonormal": not args.no_orthonormal, "init": args.init})
        connect(cfg)
        manifest = extract(cfg)
        # The spectrum, the PCA reconstruction's validation KL per D', and the Fisher start (scored from either start).
        limit = limits(dataclasses.replace(cfg, init="fisher"))
        x = read_train_rows(cfg, manifest)
        val, targets = validation_rows(cfg.shards_path, cfg.val_fraction, cfg.seed)
        lm_head = load_lm_head(cfg.model_name, torch.device("cpu"))
        vecs = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed).float()
        with one_thread():
            for d in cfg.sweep_d_values:
                model, kl_s, mse_s = train_and_time(cfg, d, x, lm_head)
                with torch.no_grad():
                    trained = next_token_damage(lm_head, val, targets, model)
                    pca = next_token_damage(lm_head, val, targets, lambda h: h @ vecs[:, :d] @ vecs[:, :d].T)
                    start = start_basis(cfg.shards_path, cfg.val_fraction, cfg.seed, "fisher", d).float()  # the KL trials' start
                    fisher_kl = next_token_damage(lm_head, val, targets, lambda h: h @ start @ start.T)["kl"]
                    mse = evaluate([model], [val], training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed))[0]["mse"]
                rows.append((d, limit["pca_downstream_kl"][str(d)], pca, trained, limit["pca_mse"][d], mse,
                             orthonormality_error(model.weight), fisher_kl))
                costs.append((kl_s, mse_s))
    print(f"kl_objective: {model_dir.rsplit('/', 1)[-1]}, D={x.shape[1]}, vocab {lm_head.out_features:,}, "
          f"{len(x):,} train / {len(val):,} validation tokens, {cfg.num_epochs} epochs, batch {cfg.batch_size}x"
          f"{cfg.max_seq_length}, lr {cfg.learning_rate:g}, init {cfg.init}, orthonormal {cfg.orthonormal}; {time.perf_counter() - started:.0f}s")
    print(machine(load))
    print(f"{'D_prime':>8} {'pca_KL':>10} {'fisher_KL':>10} {'KL':>10} {'pca_CE+':>9} {'CE+':>9} {'pca_mse':>10} {'mse':>10} "
          f"{'ortho_err':>9}")
    for d, pca_kl, pca, trained, pca_mse, mse, ortho, fisher_kl in rows:
        assert math.isclose(pca_kl, pca["kl"], rel_tol=1e-4)  # the sweep's reference = this measurement
        print(f"{d:>8} {pca['kl']:>10.4g} {fisher_kl:>10.4g} {trained['kl']:>10.4g} {pca['ce_increase']:>9.4g} "
              f"{trained['ce_increase']:>9.4g} {pca_mse:>10.4g} {mse:>10.4g} {ortho:>9.2g}")
    out = {}
    for d, _, pca, trained, pca_mse, mse, _, fisher_kl in rows:
        out[f"kl_vs_pca_d{d}"] = print_ratio(f"kl_vs_pca_d{d}", trained["kl"], pca["kl"], "next-token KL, KL-trained / PCA")
        out[f"mse_cost_d{d}"] = print_ratio(f"mse_cost_d{d}", mse, pca_mse, "validation mse, KL-trained / PCA")
        out[f"fisher_start_d{d}"] = print_ratio(f"fisher_start_d{d}", fisher_kl, pca["kl"], "next-token KL, Fisher-metric PCA / PCA")
    kl_s, mse_s = (sum(c[i] for c in costs) / len(costs) for i in (0, 1))
    out["kl_step_cost"] = print_ratio("kl_step_cost", kl_s * 1e6, mse_s * 1e6, "us per training token, KL / MSE step")
    return out


if __name__ == "__main__":
    main()
