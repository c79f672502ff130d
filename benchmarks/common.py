"""What the benchmarks share: synthetic shards in trm_ray's format, a plain read of them,
trm_ray's optimisation step without Ray, and the ratio lines."""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trm_ray.compressor import DimensionCompressor
from trm_ray.config import Config
from trm_ray.extract import extraction_settings, shard_table, write_shard
from trm_ray.kl import LMHead
from trm_ray.files import write_json
from trm_ray.hidden import decode_hidden
from trm_ray.shards import MANIFEST, is_validation_doc, shard_name, shard_paths
from trm_ray.loop import Stepper, compile_or_eager, make_optimizer
from trm_ray.train import initial_model, objective_loss


def gaussian_rows(gen: torch.Generator, n: int, hidden_size: int) -> torch.Tensor:
    """Gaussian with a decaying scale per dimension: something to learn; throughput does not depend on it."""
    return torch.randn(n, hidden_size, generator=gen) * torch.logspace(0.5, -1.5, hidden_size)


def write_synthetic_shards(cfg: Config, hidden_size: int,
                           rows: Callable[[torch.Generator, int, int], torch.Tensor] = gaussian_rows) -> dict[str, Any]:
    """`cfg.num_samples` documents of `cfg.max_seq_length` tokens in `cfg.shards_path`, written
    with trm_ray.extract's own shard and manifest code, so readers cannot tell them from an
    extraction. `rows(gen, n, D)` draws the values.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    length, names = cfg.max_seq_length, []
    os.makedirs(cfg.shards_path, exist_ok=True)
    for index, first in enumerate(range(0, cfg.num_samples, cfg.docs_per_shard)):
        docs = min(cfg.docs_per_shard, cfg.num_samples - first)
        hidden = rows(gen, docs * length, hidden_size)
        doc_ids = np.repeat(np.arange(first, first + docs), length)
        positions = np.tile(np.arange(length), docs)
        table = shard_table(hidden, doc_ids, positions, np.zeros(docs * length, np.int32), cfg.storage_dtype)
        names.append(shard_name(index))
        write_shard(table, posixpath.join(cfg.shards_path, names[-1]))
    manifest = {
        **extraction_settings(cfg, hidden_size, cfg.storage_dtype), "revision": None,
        "num_docs": cfg.num_samples, "num_tokens": cfg.num_samples * length,
        "shards": names, "doc_tokens": [length] * cfg.num_samples,
    }
    write_json(posixpath.join(cfg.shards_path, MANIFEST), manifest)
    return manifest


def read_train_rows(cfg: Config, manifest: dict[str, Any]) -> torch.Tensor:
    """The train split as one float32 [N, D] tensor, read with plain pyarrow: the baseline every Ray path is held to."""
    table = pq.read_table(shard_paths(cfg.shards_path, manifest), columns=["doc_id", "hidden"])
    train = ~is_validation_doc(table["doc_id"].to_numpy(), cfg.val_fraction, cfg.seed)
    return decode_hidden(table.filter(pa.array(train))["hidden"])


def bare_trainer(cfg: Config, d_model: int, d_compressed: int, steps_per_epoch: int,
                 lm_head: LMHead | None = None) -> tuple[DimensionCompressor, Callable[[torch.Tensor], float]]:
    """trm_ray's optimisation without Ray: the same initialisation, objective (`lm_head` for a KL one), and
    `loop.Stepper` (its schedule, the clipped AdamW step with rows kept orthonormal) over a (compiled or
    eager) loss. `step(x)` makes one optimizer step on the rows `x` and returns its loss."""
    model = initial_model(dataclasses.replace(cfg, d_compressed=d_compressed), d_model)
    loss_fn = compile_or_eager(objective_loss(cfg, lm_head), cfg.torch_compile)
    step = Stepper(make_optimizer(model, cfg), loss_fn, cfg, steps_per_epoch * cfg.num_epochs)
    return model, lambda x: step([model], x).item()


def machine(load_at_start: float) -> str:
    """Cores and 1-minute load average at the start and now: on a shared machine, other people's
    work moves every figure, so a result is only read together with this line."""
    return f"machine: {os.cpu_count()} cores, 1-minute load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"


def print_ratio(name: str, ours: float, baseline: float, unit: str) -> float:
    """Print `ratio NAME: Rx (ours / baseline UNIT)`, R to 3 significant digits: the line tests/test_benchmarks.py looks for."""
    ratio = ours / baseline
    print(f"ratio {name}: {ratio:.3g}x ({ours:,.6g} / {baseline:,.6g} {unit})", flush=True)
    return ratio
