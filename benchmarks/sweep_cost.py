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
    python -m benchmarks.sweep_cost --smoke    # 60 documents, 2 D', 1 epoch: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import bare_trainer, machine, print_ratio
from trm_ray import sweep
from trm_ray.cli import connect
from trm_ray.config import Config, load_yaml, make_config
from trm_ray.extract import extract, hidden_rows
from trm_ray.model import load_model
from trm_ray.text import read_documents, tokenize
from trm_ray.quickstart import write_assets
from trm_ray.shards import is_validation_doc
from trm_ray.spectrum import training_mean
from trm_ray.train import evaluate, one_thread

QUICKSTART = Path(__file__).resolve().parent.parent / "tune_configs" / "quickstart.yaml"
# Compiling would take longer than the whole smoke run.
SMOKE = dict(num_samples=60, docs_per_shard=30, sweep_d_values=[8, 16], num_epochs=1, grace_period=1,
             torch_compile=False)


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
            metrics = evaluate(model, (hidden(val_docs[i:i + cfg.batch_size])
                                       for i in range(0, len(val_docs), cfg.batch_size)), mean)
            if d not in best or metrics["mse"] < best[d]["mse"]:
                best[d] = metrics
    return best, forwarded


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="60 documents, 2 D', 1 epoch: checks the script, not the cost")
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
