"""The per-worker training loop that a Ray `TorchTrainer` runs for one D'.

Reads top to bottom: setup, data, model, optimizer, loop, validation, checkpoint.
Batches are token rows from `ray.train.get_dataset_shard("train")`; validation runs on
rank 0 over the whole held-out set, so the metrics do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trm_ray.compressor import (METRICS, DimensionCompressor, load_checkpoint, metrics_from_sums, orthonormality_error,
                                orthonormalize_, plain_state, reconstruction_sums, save_checkpoint, tangent_part)
from trm_ray.config import FIELDS, Config, make_config
from trm_ray.downstream import next_token_kl, start_basis
from trm_ray.model import load_lm_head
from trm_ray.shards import decode_hidden, load_splits
from trm_ray.spectrum import training_mean
from trm_ray.tracking import publish, tracking

CHECKPOINT_FILE = "compressor.pt"  # the best compressor so far, in the seed's checkpoint format
RESUME_FILE = "resume.pt"  # model, optimizer, epoch, early-stopping state, tokens seen
KL_METRICS = ("downstream_kl", "pca_downstream_kl", "downstream_efficiency")  # kept with the best weights of a KL objective


def get_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to `peak_lr`, then cosine decay to zero at `total_steps`.

    Decaying all the way matters here: the last directions of a wide D' carry little variance,
    and minibatch noise at a 10% floor kept them measurably off the PCA optimum."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def trial_config(config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Split a trial's flat config dict into the user's Config and the run's derived facts."""
    cfg = make_config({k: v for k, v in config.items() if k in FIELDS})
    return cfg, {k: v for k, v in config.items() if k not in FIELDS}


def run_label(cfg: Config) -> str:
    """A trial's name in Tune, W&B and its artifacts: d256, or d256-lr0.001 when the sweep grids learning rates."""
    return f"d{cfg.d_compressed}" + (f"-lr{cfg.learning_rate:g}" if cfg.sweep_learning_rates else "")


def hidden_batches(iterator: Any, rows: int, device: torch.device, shuffle_seed: int | None = None) -> Iterator[torch.Tensor]:
    """Float32 [rows, D] tensors from a Ray Data iterator of shard rows."""
    shuffle = {"local_shuffle_buffer_size": 4 * rows, "local_shuffle_seed": shuffle_seed} if shuffle_seed is not None else {}
    for batch in iterator.iter_batches(batch_size=rows, batch_format="pyarrow", **shuffle):
        yield decode_hidden(batch["hidden"]).to(device, non_blocking=True)


def epoch_rows(train: Any, cfg: Config, epoch: int) -> Any:
    """This epoch's training rows, their blocks in an order drawn from (seed, epoch): every epoch
    ends its learning-rate decay on other documents, and a resumed epoch reads exactly what the
    uninterrupted one read. Held in the object store, the blocks are permuted where they are (no
    data moves); streamed, the shards are read in a permuted order (a block shuffle of a streamed
    dataset would first wait for all of it)."""
    from ray.data.dataset import MaterializedDataset

    order_seed = cfg.seed * 1000 + epoch
    if isinstance(train, MaterializedDataset):
        return train.randomize_block_order(seed=order_seed)
    return load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed, shard_order_seed=order_seed)[0]


def rank_share(dataset: Any, rank: int, world: int) -> Any:
    """This rank's equal part of `dataset`: rank 0 splits it and hands every rank its iterator, so
    the ranks take the same number of steps (DDP's all-reduce waits for all of them)."""
    if world == 1:
        return dataset
    parts = [dataset.streaming_split(world, equal=True) if rank == 0 else None]
    dist.broadcast_object_list(parts, src=0)
    return parts[0][rank]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor], mean: torch.Tensor,
             lm_head: nn.Linear | None = None) -> dict[str, float]:
    """Token-weighted metrics over every batch (the whole validation set), not a mean of batch means,
    the centred ones about `mean` (the training rows'); with `lm_head`, also the mean next-token KL of
    the head reading the reconstruction."""
    sums, kl = None, 0.0
    for x in batches:
        x_hat = model(x)
        s = reconstruction_sums(x, x_hat, mean)
        sums = s if sums is None else sums + s
        if lm_head is not None:
            kl += float(next_token_kl(lm_head, x, x_hat))
    metrics = metrics_from_sums(sums)
    if lm_head is not None:
        metrics["downstream_kl"] = kl / float(sums[6])  # sums[6]: tokens
    return metrics


def objective_loss(cfg: Config, model: nn.Module, lm_head: nn.Linear | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training loss of `--objective`, per token: reconstruction mse, next-token KL, or mse + kl_weight * KL."""
    def loss(x: torch.Tensor) -> torch.Tensor:
        x_hat = model(x)
        if cfg.objective == "mse":
            return nn.functional.mse_loss(x_hat, x)
        kl = next_token_kl(lm_head, x, x_hat) / x.shape[0]
        return kl if cfg.objective == "kl" else nn.functional.mse_loss(x_hat, x) + cfg.kl_weight * kl

    return loss


def optimizer_step(model: DimensionCompressor, optimizer: torch.optim.Optimizer,
                   loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """One step on the rows `x`: loss, backward, clipped AdamW update. With --orthonormal, Riemannian
    Adam on the manifold of orthonormal rows (so WᵀW stays a projection, what phase 2 needs): the
    gradient projected onto the tangent space before the update, the rows put back onto an
    orthonormal set after it (the retraction), and Adam's momentum carried to the new point's tangent
    space (vector transport by projection). Adam's moments then never accumulate the part of a
    gradient that only rescales the rows, which the retraction throws away: a KL objective's
    gradient has one, which plain Adam fed back into every later step."""
    loss = loss_fn(x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    w = model.weight
    if cfg.orthonormal:
        w.grad = tangent_part(w, w.grad)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if cfg.orthonormal:
        orthonormalize_(w)
        momentum = optimizer.state[w]["exp_avg"]
        momentum.copy_(tangent_part(w, momentum))
    return loss


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs whose loss is not `min_delta` (relative) below the best so far."""

    patience: int
    min_delta: float
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, loss: float) -> bool:
        """Record one epoch's loss; True when the trial should stop."""
        if loss < self.best * (1 - self.min_delta):
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, as in every 1-CPU Ray worker (OMP_NUM_THREADS=1). Ops as small as a
    compressor's gain nothing from threads, and on a busy machine threads that wait on each other's
    descheduled siblings made them erratically slow (up to 20x): it keeps baselines steady too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compile_or_eager(fn: Callable[[torch.Tensor], torch.Tensor], enabled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch.compile(fn)` where compilation works; where the first call fails, eager `fn` (said once)."""
    if not enabled:
        return fn
    compiled = torch.compile(fn)
    state = {"compiled_ok": None}

    def step(x: torch.Tensor) -> torch.Tensor:
        if state["compiled_ok"] is False:
            return fn(x)
        try:
            out = compiled(x)
        except Exception as e:
            if state["compiled_ok"]:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eagerly", flush=True)
            state["compiled_ok"] = False
            return fn(x)
        state["compiled_ok"] = True
        return out

    return step


def initial_model(cfg: Config, run: dict[str, Any]) -> DimensionCompressor:
    """Stage 1a: the --init start (orthogonal, PCA, or for a KL objective PCA in the LM head's Fisher
    metric, or PCA's where that is better: `start_basis`); stage 1b starts from the stage 1a weights
    of the same D and D'."""
    torch.manual_seed(cfg.seed)
    model = DimensionCompressor(run["d_model"], cfg.d_compressed)
    start = cfg.init_checkpoint(cfg.d_compressed)
    if cfg.init != "orthogonal" and not start:
        basis = start_basis(cfg.shards_path, cfg.val_fraction, cfg.seed, cfg.init, cfg.d_compressed)
        with torch.no_grad():  # rows = the top-D' directions (for PCA, the MSE optimum itself, up to a rotation)
            model.weight.copy_(basis.T)
    if start:
        ckpt = load_checkpoint(start, d_model=run["d_model"], d_compressed=cfg.d_compressed)
        model.load_state_dict(ckpt["compressor"])
    return model


def make_optimizer(model: nn.Module, cfg: Config, saved: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters, with a saved state loaded. Call it after the model is on its
    device (`prepare_model`): loading moves Adam's moments to their parameter's device and dtype,
    whereas moving the model afterwards leaves them behind, and the first step on a GPU fails."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved)
    return optimizer


def quiet_ray_logs() -> None:
    """Keep the sweep's log readable: Ray Train logs each report's whole metrics dict at INFO (Tune's
    table, the summary and W&B show them), and Ray Data a summary of every pass over the data
    (two a trial every epoch; the dashboard's Ray Data view keeps them)."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(("train/v2/_internal/execution/context.py", "train.v2._internal.execution.context")):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any], train: Any) -> None:
    """One worker's training of one D'; `train` is the training split's Ray Dataset (each epoch reads
    its own block order of it, see epoch_rows)."""
    import ray.train
    import ray.train.torch

    cfg, run = trial_config(config)
    quiet_ray_logs()
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()

    model = initial_model(cfg, run)
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    start_epoch, step, tokens_seen, best, state = 0, 0, 0, None, None
    resumed = ray.train.get_checkpoint()
    if resumed:  # a replaced worker, or a restored sweep: continue where the last report left off
        with resumed.as_directory() as d:
            state = torch.load(f"{d}/{RESUME_FILE}", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        stopper = EarlyStopping(**state["stopper"])
        start_epoch, step, tokens_seen, best = state["epoch"], state["step"], state["tokens_seen"], state["best"]
        print(f"d{cfg.d_compressed}: resuming after epoch {start_epoch} from {resumed.path}", flush=True)
    ddp = ray.train.torch.prepare_model(model)  # DDP when world > 1, moved to the worker's device
    optimizer = make_optimizer(model, cfg, state["optimizer"] if state else None)
    # Loaded once per worker: what phase 2 decompresses into, so what a KL objective trains against.
    lm_head = load_lm_head(cfg.model_name, device) if cfg.objective != "mse" else None
    # Validation scores in float32 like the export and the PCA reference: bf16 logits (what a GPU trains
    # with) would put a noise floor under the small KLs of a wide D', and downstream_efficiency on it.
    score_head = lm_head
    if rank == 0 and lm_head is not None and lm_head.weight.dtype != torch.float32:
        score_head = copy.deepcopy(lm_head).float()
    loss_fn = compile_or_eager(objective_loss(cfg, ddp, lm_head), cfg.torch_compile)
    rows = cfg.batch_size * cfg.max_seq_length
    total_steps = math.ceil(run["train_tokens"] / world / rows) * cfg.num_epochs
    warmup_steps = max(1, int(cfg.warmup_ratio * total_steps))
    name = f"{cfg.wandb_run_name or f'stage{cfg.stage}'}-{run_label(cfg)}"
    log = tracking(cfg.use_wandb, rank, project=cfg.wandb_project, group=run["group"], name=name, config=config,
                   directory=cfg.output_dir)

    val_shard = ray.train.get_dataset_shard("val")
    pca_mse = run["pca_mse"][str(cfg.d_compressed)]
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed).to(device)
    score = cfg.score_metric
    best_keys = METRICS if lm_head is None else (*METRICS, *KL_METRICS)

    def validate() -> dict[str, float]:
        m = evaluate(model.eval(), hidden_batches(val_shard, rows, device), mean, score_head)
        # How close to the best any tied linear compressor of this width can get (1.0 = optimal).
        m.update({"pca_mse": pca_mse, "pca_efficiency": pca_mse / m["mse"],
                  "orthonormality_error": orthonormality_error(model.weight)})
        if lm_head is not None:  # the same ratio for what the LM head reads (> 1: better than PCA)
            pca_kl = run["pca_downstream_kl"][str(cfg.d_compressed)]
            m.update({"pca_downstream_kl": pca_kl, "downstream_efficiency": pca_kl / m["downstream_kl"]})
        return m

    metrics: dict[str, Any] = {}
    if rank == 0 and not resumed:
        # Where training starts from (1a: PCA or orthogonal, 1b: the 1a weights), scored on this run's
        # validation set. It is the first candidate for the best checkpoint, so a trial never exports
        # anything worse than its start (epoch 0), and epochs must beat it to count as improvements.
        start = validate()
        metrics = {f"initial_{k}": v for k, v in start.items() if k not in ("pca_mse", "pca_downstream_kl")}
        best = {"state": plain_state(model), **{k: start[k] for k in best_keys}, "epoch": 0}
        stopper.update(start[score])
    for epoch in range(start_epoch, cfg.num_epochs):
        model.train()
        t0, epoch_tokens, loss_sum = time.perf_counter(), 0, 0.0
        train_shard = rank_share(epoch_rows(train, cfg, epoch), rank, world)
        for x in hidden_batches(train_shard, rows, device, shuffle_seed=cfg.seed * 1000 + epoch):
            lr = get_lr(step, total_steps, warmup_steps, cfg.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = optimizer_step(model, optimizer, loss_fn, x, cfg)
            step += 1
            epoch_tokens += x.shape[0]
            loss_sum += loss.item() * x.shape[0]
        counts = torch.tensor([epoch_tokens, loss_sum], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
        elapsed = time.perf_counter() - t0
        tokens_seen += int(counts[0])
        metrics.update({"epoch": epoch + 1, "resumed_after_epoch": start_epoch, "d_compressed": cfg.d_compressed,
                        "tokens_seen": tokens_seen, "train_loss": float(counts[1] / counts[0]),
                        "tokens_per_s": float(counts[0]) / elapsed, "lr": lr})

        checkpoint, stop = None, False
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                metrics.update(validate())
                # NaN compares false with everything: a NaN epoch must neither become the best nor count as one.
                finite = all(math.isfinite(metrics[k]) for k in ("mse", score, "train_loss"))
                if finite and (best is None or metrics[score] < best[score]):
                    best = {"state": plain_state(model), **{k: metrics[k] for k in best_keys}, "epoch": epoch + 1}
                stop = not finite or (cfg.early_stopping and stopper.update(metrics[score]))
                if not finite:
                    metrics["stop_reason"] = (f"diverged: train loss {metrics['train_loss']}, validation {score} {metrics[score]}; "
                                              "lower --learning_rate")
                elif stop:
                    metrics["stop_reason"] = (f"early stopping: validation {score} did not improve by {cfg.early_stopping_min_delta:g} "
                                              f"(relative) for {cfg.early_stopping_patience} epochs")
                if stop:
                    print(f"d{cfg.d_compressed}: {metrics['stop_reason']}; stopped after epoch {epoch + 1}", flush=True)
                if best is not None:  # none only when the first epoch already diverged: nothing worth keeping
                    metrics["best_mse"] = best["mse"]
                    metrics[f"best_{score}"] = best[score]
                    # Every report carries the whole resumable state; its compressor.pt is the best so far.
                    save_best(f"{tmp}/{CHECKPOINT_FILE}", best, config)
                    torch.save({"model": plain_state(model), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                "step": step, "tokens_seen": tokens_seen, "best": best,
                                "stopper": dataclasses.asdict(stopper)}, f"{tmp}/{RESUME_FILE}")
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                log.log(metrics)
                publish(metrics, trial=ctx.get_experiment_name(), sweep=run["group"], stage=cfg.stage)
            ray.train.report(metrics, checkpoint=checkpoint)
            metrics = {}
        if world > 1:  # every rank stops together
            flag = torch.tensor([float(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
    if rank == 0 and best is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save_best(f"{tmp}/{CHECKPOINT_FILE}", best, config)
            log.log_checkpoint(f"{tmp}/{CHECKPOINT_FILE}", {k: v for k, v in best.items() if k != "state"})
    if rank == 0:
        log.finish()


def save_best(path: str, best: dict[str, Any], config: dict[str, Any]) -> None:
    score = trial_config(config)[0].score_metric
    save_checkpoint(path, best["state"], config, best[score], {k: v for k, v in best.items() if k != "state"})


def scaling_config(cfg: Config) -> Any:
    """The trial's workers and what each asks for (also what the sweep counts to decide how many trials fit)."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)


def make_trainer(config: dict[str, Any], train: Any, val: Any, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for one D': scaling, data, checkpointing, all in one visible place."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    cfg, run = trial_config(config)
    # Blocks in an order drawn from (seed, epoch) + a seeded shuffle buffer: a data order that
    # changes every epoch yet is the same on every run, so a resumed or recompiled run can be
    # compared with an uninterrupted one. The training loop reads `train` itself, one block order
    # per epoch (epoch_rows); Train's ingest serves the validation set, which is not split: rank 0
    # scores the whole held-out set. Built directly: Train's default_ingest_options passes on the
    # deprecated exclude_resources, and every trial and controller logged Ray's warning about it.
    ingest = ExecutionOptions(preserve_order=True)
    return TorchTrainer(
        functools.partial(train_loop_per_worker, train=train),
        train_loop_config=config,
        scaling_config=scaling_config(cfg),
        datasets={"val": val},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest),
        run_config=ray.train.RunConfig(
            name=f"d{cfg.d_compressed}-lr{cfg.learning_rate:g}",
            storage_path=run["train_storage"],
            # The one checkpoint kept is the latest: it resumes the trial and its compressor.pt is the trial's best.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="epoch", checkpoint_score_order="max"),
            # A worker group that cannot start (its resources never come) fails the trial on a local Ray,
            # where nothing will add them; a cluster waits for its autoscaler (Train's default, no limit).
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=0 if cfg.address is None else -1),
            callbacks=callbacks or [],
        ),
    )
