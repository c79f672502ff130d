"""The per-worker training loop that a Ray `TorchTrainer` runs for one D'.

Reads top to bottom: setup, data, model, optimizer, loop, validation, checkpoint.
Batches are token rows from `ray.train.get_dataset_shard("train")`; validation runs on
rank 0 over the whole held-out set, so the metrics do not depend on the number of workers.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trm_ray.compressor import METRICS, DimensionCompressor, metrics_from_sums, reconstruction_sums, save_checkpoint
from trm_ray.config import FIELDS, Config, make_config
from trm_ray.shards import decode_hidden

CHECKPOINT_FILE = "compressor.pt"


def get_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to `peak_lr`, then cosine decay to 10% of it at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def trial_config(config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Split a trial's flat config dict into the user's Config and the run's derived facts."""
    cfg = make_config({k: v for k, v in config.items() if k in FIELDS})
    return cfg, {k: v for k, v in config.items() if k not in FIELDS}


def hidden_batches(iterator: Any, rows: int, device: torch.device, shuffle_seed: int | None = None) -> Iterator[torch.Tensor]:
    """Float32 [rows, D] tensors from a Ray Data iterator of shard rows."""
    shuffle = {"local_shuffle_buffer_size": 4 * rows, "local_shuffle_seed": shuffle_seed} if shuffle_seed is not None else {}
    for batch in iterator.iter_batches(batch_size=rows, batch_format="pyarrow", **shuffle):
        yield decode_hidden(batch["hidden"]).to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Token-weighted metrics over every batch (the whole validation set), not a mean of batch means."""
    sums = None
    for x in batches:
        s = reconstruction_sums(x, model(x))
        sums = s if sums is None else sums + s
    return metrics_from_sums(sums)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg, run = trial_config(config)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    model = DimensionCompressor(run["d_model"], cfg.d_compressed)
    ddp = ray.train.torch.prepare_model(model)  # DDP when world > 1, moved to the worker's device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rows = cfg.batch_size * cfg.max_seq_length
    steps_per_epoch = math.ceil(run["train_tokens"] / world / rows)
    total_steps = steps_per_epoch * cfg.num_epochs
    warmup_steps = max(1, int(cfg.warmup_ratio * total_steps))

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    best_mse, step, tokens_seen = math.inf, 0, 0
    for epoch in range(cfg.num_epochs):
        model.train()
        t0, epoch_tokens, loss_sum = time.perf_counter(), 0, 0.0
        for x in hidden_batches(train_shard, rows, device, shuffle_seed=cfg.seed * 1000 + epoch):
            lr = get_lr(step, total_steps, warmup_steps, cfg.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = nn.functional.mse_loss(ddp(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            epoch_tokens += x.shape[0]
            loss_sum += loss.item() * x.shape[0]
        counts = torch.tensor([epoch_tokens, loss_sum], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
        elapsed = time.perf_counter() - t0
        tokens_seen += int(counts[0])

        metrics: dict[str, Any] = {"epoch": epoch + 1, "d_compressed": cfg.d_compressed, "tokens_seen": tokens_seen,
                                   "train_loss": float(counts[1] / counts[0]), "tokens_per_s": float(counts[0]) / elapsed,
                                   "lr": lr}
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                model.eval()
                metrics.update(evaluate(model, hidden_batches(val_shard, rows, device)))
                if metrics["mse"] < best_mse:
                    best_mse = metrics["mse"]
                    best = {k: metrics[k] for k in METRICS}
                    save_checkpoint(f"{tmp}/{CHECKPOINT_FILE}", model, config, best_mse,
                                    {**best, "epoch": epoch + 1})
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def make_trainer(config: dict[str, Any], train: Any, val: Any, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for one D': scaling, data, checkpointing, all in one visible place."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, run = trial_config(config)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        datasets={"train": train, "val": val},
        # Validation is not split: rank 0 scores the whole held-out set.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=f"d{cfg.d_compressed}",
            storage_path=run["train_storage"],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="mse", checkpoint_score_order="min"),
            callbacks=callbacks or [],
        ),
    )
