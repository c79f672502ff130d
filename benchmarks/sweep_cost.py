"""Sweep cost: trm_ray's extract-once sweep vs the seed's design, which ran the LLM inside every training step.

Both run on the quickstart model and corpus (trm_ray.quickstart) with the settings of
tune_configs/quickstart.yaml: the same D' values, epochs, batch size, learning-rate
schedule, training and validation documents (trm_ray.shards.is_validation_doc). trm_ray
starts Ray, extracts the hidden states once (trm_ray.extract.extract) and sweeps with
trm_ray.sweep.run, whose ASHA and early stopping may end a trial before the last epoch.
The seed loop, in one process, gets each batch's hidden states from a fresh LLM forward
in every step of every epoch of every D', runs every epoch, and scores the validation
documents after each epoch the same way. Reported: both wall times and their ratio, the
documents each sent through the LLM, and each D's best validation cosine.

    python -m benchmarks.sweep_cost            # the quickstart: 400 documents, its D' values and epochs
    python -m benchmarks.sweep_cost --smoke    # 60 documents, 2 D': checks the script

With --scale it runs nothing: for a configuration (any sweep flag, --config a YAML) it prints what
each stage costs before it is spent: passes over the shards, bytes read, and the LLM's and the LM
head's FLOPs, for trm_ray's design next to the one before it (a trial per D' and learning rate, each
reading the shards and computing the teacher's logits for itself; SGD epochs for the MSE sweep from
PCA too). The bytes a row are measured here, on shards of the configuration's hidden size and
dtype written by trm_ray's own shard code; the rest is counted, for the configuration's upper
bound of tokens (num_samples x max_seq_length).

    HF_HUB_OFFLINE=1 python -m benchmarks.sweep_cost --scale --config tune_configs/smollm3_stage1a.yaml --model_type smollm3
    HF_HUB_OFFLINE=1 python -m benchmarks.sweep_cost --scale --config tune_configs/smollm3_stage1a.yaml --model_type smollm3 --objective kl
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transformers import AutoConfig

from benchmarks.common import bare_trainer, machine, print_ratio, write_synthetic_shards
from trm_ray import sweep
from trm_ray.cluster import connect
from trm_ray.config import Config, UserError, build_parser, config_from_args, load_yaml, make_config
from trm_ray.downstream import FISHER_TOKENS, MIX_GRID, START_TOKENS
from trm_ray.extract import extract, hidden_rows, resolve_storage_dtype
from trm_ray.model import flops_per_token, load_model, load_model_config
from trm_ray.text import read_documents, tokenize
from trm_ray.quickstart import write_assets
from trm_ray.shards import is_validation_doc, shard_paths
from trm_ray.references import training_mean
from trm_ray.loop import evaluate, one_thread
from trm_ray.phase2 import REFINE_BATCH, REFINE_STEPS

QUICKSTART = Path(__file__).resolve().parent.parent / "tune_configs" / "quickstart.yaml"
# Compiling would take longer than the whole smoke run.
# The quickstart's settings otherwise, so trm_ray exports the closed form as in the full run (no --num_epochs).
SMOKE = dict(num_samples=60, docs_per_shard=30, sweep_d_values=[8, 16], torch_compile=False)


def seed_sweep(cfg: Config) -> tuple[dict[int, dict[str, float]], int]:
    """The seed's loop: each D' trained from scratch on hidden states that the LLM recomputes for
    every batch. Returns each D's best (lowest mse) validation metrics and the documents the LLM processed."""
    tokenizer, llm, _ = load_model(cfg.model_name, torch.device("cpu"), cfg.layer)
    docs = tokenize(tokenizer, read_documents(cfg), cfg).ids
    held_out = is_validation_doc(np.arange(len(docs)), cfg.val_fraction, cfg.seed)
    train_docs = [d for d, v in zip(docs, held_out) if not v]
    val_docs = [d for d, v in zip(docs, held_out) if v]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed)  # of trm_ray's sweep, which ran first
    forwarded = 0

    def hidden(batch: list[list[int]]) -> torch.Tensor:
        nonlocal forwarded
        forwarded += len(batch)
        return hidden_rows(llm, batch, pad, cfg.batch_size * cfg.max_seq_length, cfg.batch_size)[0]

    best: dict[int, dict[str, float]] = {}
    for d in cfg.d_values:
        model, step = bare_trainer(cfg, llm.config.hidden_size, d, math.ceil(len(train_docs) / cfg.batch_size))
        for _ in range(cfg.num_epochs):
            for batch in torch.randperm(len(train_docs)).split(cfg.batch_size):
                step(hidden([train_docs[i] for i in batch]))
            metrics = evaluate([model], (hidden(val_docs[i:i + cfg.batch_size])
                                         for i in range(0, len(val_docs), cfg.batch_size)), mean)[0]
            if d not in best or metrics["mse"] < best[d]["mse"]:
                best[d] = metrics
    return best, forwarded


def bytes_per_row(cfg: Config, hidden_size: int) -> float:
    """Parquet bytes a token row takes in shards of `cfg`'s dtype at `hidden_size`, measured on 4 documents written here."""
    with tempfile.TemporaryDirectory() as work_dir:
        small = dataclasses.replace(cfg, num_samples=4, docs_per_shard=4, shards_dir=work_dir,
                                    storage_dtype=resolve_storage_dtype(cfg))
        manifest = write_synthetic_shards(small, hidden_size)
        return sum(os.path.getsize(p) for p in shard_paths(work_dir, manifest)) / manifest["num_tokens"]


def head_flop_per_row(d: int, width: int, rows: int, vocab: int) -> float:
    """LM-head FLOP a training row of one width costs beside the shared teacher: the cheaper of the factored
    student (A = U Wᵀ once a step) and the residual through the full D (`kl.grid_kl`)."""
    return min(6 * vocab * width + 4 * vocab * d * width / rows, 4 * vocab * d)


def stage_costs(cfg: Config, model_config: Any, row_bytes: float) -> dict[str, list[tuple[str, float, float, float]]]:
    """For the design before and trm_ray's: (stage, passes over the shards, bytes read, head FLOP) per stage,
    and the extraction's LLM FLOP in the first row's place of the head's."""
    d, vocab = int(model_config.hidden_size), int(model_config.vocab_size)
    tokens = cfg.num_samples * cfg.max_seq_length
    train, val = tokens * (1 - cfg.val_fraction), tokens * cfg.val_fraction
    widths, lrs, epochs = cfg.d_values, len(cfg.sweep_learning_rates) or 1, cfg.num_epochs
    rows = cfg.batch_size * cfg.max_seq_length
    kl = cfg.objective != "mse"
    extraction = ("extraction (writes; LLM FLOP)", 0.0, 0.0, tokens * flops_per_token(model_config, cfg.layer))
    spectrum = ("spectrum: second moments", 1.0, tokens * row_bytes, 0.0)
    references = [("Fisher start + PCA's KL", FISHER_TOKENS / tokens + cfg.val_fraction,
                   (FISHER_TOKENS + val) * row_bytes, FISHER_TOKENS * 4 * vocab * d + val * len(widths) * 4 * vocab * d)] if kl else []
    downstream = [("export: downstream KL", cfg.val_fraction, val * row_bytes,
                   val * (2 + 4 * len(widths)) * vocab * d)] if cfg.layer == -1 and cfg.downstream else []
    trials_before = len(widths) * lrs
    before = [("training: a trial per D' and lr", trials_before * epochs, trials_before * epochs * tokens * row_bytes,
               trials_before * epochs * (train * 6 + val * 4) * vocab * d if kl else 0.0)]
    if cfg.closed_form:
        now = [("training: none (closed form)", 0.0, 0.0, 0.0)]
    else:
        grid = 2 * vocab * d + sum(head_flop_per_row(d, w, rows, vocab) for w in widths)
        now = [("training: a trial per lr, every D'", lrs * epochs, lrs * epochs * tokens * row_bytes,
                lrs * epochs * (train * grid + val * (2 + 2 * len(widths)) * vocab * d) if kl else 0.0)]
    shared = [extraction, spectrum, *references]
    return {"before": [*shared, *before, *downstream], "trm_ray": [*shared, *now, *downstream]}


def node_use(cfg: Config, model_config: Any, gpus: int, tflops: float) -> None:
    """On one node of `gpus` GPUs, each phase that reads the LM head: GPUs busy, wall hours, the node's GPU-hours and
    the fraction of them busy, with validation and the reference and scoring passes on one GPU (as before they were
    split) and split over the trial's workers and the node's GPUs (now). Counted from the head's FLOPs at `tflops`
    of sustained throughput a GPU, an assumption to replace with a measured rate (`benchmarks.gpu_run`)."""
    d, vocab = int(model_config.hidden_size), int(model_config.vocab_size)
    tokens = cfg.num_samples * cfg.max_seq_length
    train, val, widths = tokens * (1 - cfg.val_fraction), tokens * cfg.val_fraction, cfg.d_values
    lrs, workers, rows = len(cfg.sweep_learning_rates) or 1, cfg.num_workers, cfg.batch_size * cfg.max_seq_length
    trials_at_once = min(lrs, max(1, gpus // workers))
    rounds = math.ceil(lrs / trials_at_once)
    step = (train * (2 * vocab * d + sum(head_flop_per_row(d, w, rows, vocab) for w in widths))) if cfg.objective != "mse" else 0.0
    validation = val * (2 + 2 * len(widths)) * vocab * d  # the teacher and each width's residual, per epoch
    passes = (val * len(widths) * 4 * vocab * d if cfg.objective == "kl" else 0.0) + val * (2 + 4 * len(widths)) * vocab * d
    # Before any trial, one task before, split now: --init fisher's Fisher information (every GPU a range of its
    # rows), phase 2's references and start (a D' a GPU: candidates scored on the training closing states, one a
    # conversation, then REFINE_STEPS forward and backward passes of REFINE_BATCH of them through the head).
    starts = []
    if cfg.objective == "kl" and cfg.init == "fisher":
        starts.append(("Fisher start", gpus, FISHER_TOKENS * 4 * vocab * d))
    if cfg.objective == "phase2":
        close = min(START_TOKENS, cfg.num_samples * (1 - cfg.val_fraction))
        per_width = (REFINE_STEPS * REFINE_BATCH * 12 + (len(MIX_GRID) + 3) * close * 4) * vocab * d
        starts.append(("phase 2's references and start", min(gpus, len(widths)), len(widths) * per_width))
    rate = tflops * 1e12 * 3600  # FLOP a GPU-hour
    print(f"\none node of {gpus} GPUs at {tflops:g} TFLOP/s each (assumed), {lrs} trial(s) x {workers} worker(s), "
          f"{trials_at_once} at once:\n{'phase':<40} {'GPUs busy':>10} {'wall h':>8} {'node GPU-h':>11} {'busy':>6}")
    for design, split in (("before: validation, passes on one GPU", False), ("now: split over workers and GPUs", True)):
        busy_passes = gpus if split else 1
        # A round of trials: each trial's steps on its workers, its validation on them all or on rank 0 alone.
        round_h = cfg.num_epochs * (step / workers + validation / (workers if split else 1)) / rate
        phases = [*((name, most if split else 1, work / (most if split else 1) / rate, work / rate) for name, most, work in starts),
                  ("reference + scoring passes", busy_passes, passes / busy_passes / rate, passes / rate),
                  ("training (epochs, validation)", trials_at_once * workers, rounds * round_h,
                   lrs * cfg.num_epochs * (step + validation) / rate)]
        print(design)
        for name, busy, wall, work in phases:  # work: GPU-hours of computing, whatever the GPUs' layout
            print(f"  {name:<38} {busy:>10} {wall:>8.3g} {wall * gpus:>11.3g} {work / max(wall * gpus, 1e-30):>6.0%}")


def print_scale(cfg: Config, model_config: Any, gpus: int = 8, tflops: float = 400.0) -> dict[str, float]:
    row_bytes = bytes_per_row(cfg, int(model_config.hidden_size))
    tokens = cfg.num_samples * cfg.max_seq_length
    print(f"sweep_cost --scale: {cfg.model_name} ({model_config.model_type}, D={model_config.hidden_size}, "
          f"V={model_config.vocab_size:,}), layer {cfg.layer}, stage {cfg.stage}, --objective {cfg.objective}, "
          f"init {cfg.init}; up to {tokens:,} token rows; D' in {cfg.d_values}, {len(cfg.sweep_learning_rates) or 1} "
          f"learning rate(s), up to {cfg.num_epochs} epochs; {row_bytes:,.0f} bytes a row ({resolve_storage_dtype(cfg)}, "
          f"measured on shards written here)")
    totals = {}
    for design, stages in stage_costs(cfg, model_config, row_bytes).items():
        print(f"\n{design}:\n{'stage':<36} {'passes':>8} {'GB read':>10} {'TFLOP':>12}")
        for name, passes, read, flop in stages:
            print(f"{name:<36} {passes:>8.3g} {read / 1e9:>10,.1f} {flop / 1e12:>12,.4g}")
        totals[design] = (sum(s[2] for s in stages), sum(s[3] for s in stages[1:]))
        print(f"{'after extraction, in all':<36} {'':>8} {totals[design][0] / 1e9:>10,.1f} {totals[design][1] / 1e12:>12,.4g}"
              "  (LM head)")
    node_use(cfg, model_config, gpus, tflops)
    (read_before, head_before), (read_now, head_now) = totals["before"], totals["trm_ray"]
    ratios = {"bytes_read_trm_ray/before": print_ratio("bytes_read_trm_ray/before", read_now, read_before, "bytes")}
    if head_before:
        ratios["head_flop_trm_ray/before"] = print_ratio("head_flop_trm_ray/before", head_now, head_before, "FLOP")
    return ratios


def scale_main(argv: list[str]) -> dict[str, float]:
    parser = build_parser("python -m benchmarks.sweep_cost --scale", "What a sweep of this configuration reads and computes")
    parser.add_argument("--model_type", help="Count for transformers' default config of this architecture when the model "
                                             "itself is not on this machine (smollm3: SmolLM3-3B's).")
    parser.add_argument("--node_gpus", type=int, default=8, help="GPUs of the one node the GPU-hours are counted on")
    parser.add_argument("--gpu_tflops", type=float, default=400.0,
                        help="sustained TFLOP/s a GPU is assumed to reach on the head's matmuls (replace with a measured rate)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        model_config = load_model_config(cfg.model_name)
    except UserError:
        if not args.model_type:
            raise
        model_config = AutoConfig.for_model(args.model_type)
    return print_scale(cfg, model_config, args.node_gpus, args.gpu_tflops)


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    if "--scale" in argv:
        return scale_main([a for a in argv if a != "--scale"])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="60 documents, 2 D': checks the script, not the cost")
    smoke = parser.parse_args(argv).smoke
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        assets = write_assets(os.path.join(work_dir, "assets"), num_docs=SMOKE["num_samples"] if smoke else 400)
        values = load_yaml(QUICKSTART) | dict(model_name=assets["model"], dataset=assets["corpus"], use_wandb=False,
                                              output_dir=os.path.join(work_dir, "out"))
        cfg = make_config(values | (SMOKE if smoke else {}))

        t0 = time.perf_counter()
        connect(cfg)
        t1 = time.perf_counter()
        trm_forwarded = extract(cfg)["num_docs"]
        t2 = time.perf_counter()
        rows = sweep.run(cfg)  # finds the shards complete and goes straight to training
        t3 = time.perf_counter()
        # One thread, like each trm_ray worker; eager, like the seed (compiling would only add to its time).
        with one_thread():
            seed_best, seed_forwarded = seed_sweep(dataclasses.replace(cfg, torch_compile=False))
        seed_wall = time.perf_counter() - t3
    trm_wall = t3 - t0

    print(f"sweep_cost: {cfg.num_samples} documents, D' in {cfg.d_values}, up to {cfg.num_epochs} epochs, "
          f"batch {cfg.batch_size} x {cfg.max_seq_length} tokens")
    print(f"wall: trm_ray {trm_wall:.1f}s (Ray start-up {t1 - t0:.1f}s, extraction {t2 - t1:.1f}s, "
          f"sweep {t3 - t2:.1f}s) | seed loop {seed_wall:.1f}s")
    print(machine(load))
    print(f"documents through the LLM: trm_ray {trm_forwarded:,} | seed loop {seed_forwarded:,}")
    # trm_ray wins once the forwards it saves cost more than everything it spends besides extraction.
    beyond_llm = trm_wall - (t2 - t1)
    print(f"break-even: trm_ray spent {beyond_llm:.1f}s besides extraction, so it is faster once one document's "
          f"LLM forward costs over {beyond_llm / (seed_forwarded - trm_forwarded) * 1e3:.1f} ms; "
          f"the seed loop spent {seed_wall / seed_forwarded * 1e3:.2f} ms a document, compressor step included")
    print(f"{'D_prime':>8} {'trm_ray epochs':>15} {'trm_ray cosine':>15} {'seed epochs':>12} {'seed cosine':>12}")
    for row in rows:
        d = row["d_compressed"]
        print(f"{d:>8} {row.get('epochs_trained', 0):>15} {row.get('cosine_similarity', math.nan):>15.4f} "
              f"{cfg.num_epochs:>12} {seed_best[d]['cosine_similarity']:>12.4f}")
    return {
        "seed_wall/trm_ray_wall": print_ratio("seed_wall/trm_ray_wall", seed_wall, trm_wall, "s"),
        "seed_llm_docs/trm_ray_llm_docs": print_ratio("seed_llm_docs/trm_ray_llm_docs", seed_forwarded,
                                                      trm_forwarded, "documents"),
    }


if __name__ == "__main__":
    main()
