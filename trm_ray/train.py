"""The per-worker training loop that a Ray `TorchTrainer` runs for one learning rate and every D' of the grid.

Reads top to bottom: setup, data, models, optimizer, loop, validation, checkpoint. Every D' trains
on the same batches: each batch is read (and, for a KL objective, its teacher logits computed) once
for all of them, not once per D'. Each D' keeps its own early stopping, best weights, checkpoint and
W&B run, and stops on its own (early stopping, divergence, or ASHA among the learning rates of the
same width). Validation runs on rank 0 over the whole held-out set, so the metrics do not depend on
the number of workers.
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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trm_ray.compressor import (DimensionCompressor, load_checkpoint, metrics_from_sums, orthonormality_error,
                                orthonormalize_, plain_state, reconstruction_sums, save_checkpoint, tangent_part)
from trm_ray.cluster import scaling_config
from trm_ray.names import CHECKPOINT_FILE, KL_METRICS, METRICS, RESUME_FILE, width_key
from trm_ray import phase2
from trm_ray.config import Config, FIELDS, make_config
from trm_ray.kl import damage_sums, grid_kl
from trm_ray.references import start_basis
from trm_ray.kl import LMHead
from trm_ray.model import load_lm_head
from trm_ray.shards import read_manifest, rows_per_block, shard_paths, side_tables, stored_hidden
from trm_ray.references import training_mean
from trm_ray.tracking import publish, tracking


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


def hidden_batches(iterator: Any, rows: int, device: torch.device, shuffle_seed: int | None = None,
                   regions: bool = False) -> Iterator[Any]:
    """Float32 [rows, D] tensors on `device` from a Ray Data iterator of shard rows: sent in the shards' dtype
    (bf16: half the bytes) and converted to float32 there; with `regions`, (rows, each row's region code)."""
    shuffle = {"local_shuffle_buffer_size": 4 * rows, "local_shuffle_seed": shuffle_seed} if shuffle_seed is not None else {}
    for batch in iterator.iter_batches(batch_size=rows, batch_format="pyarrow", **shuffle):
        x = stored_hidden(batch["hidden"]).to(device, non_blocking=True).float()
        yield (x, torch.from_numpy(batch["region"].to_numpy()).to(device)) if regions else x


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
    the ranks take the same number of steps (each step's gradient all-reduce waits for all of them)."""
    if world == 1:
        return dataset
    parts = [dataset.streaming_split(world, equal=True) if rank == 0 else None]
    dist.broadcast_object_list(parts, src=0)
    return parts[0][rank]


@torch.no_grad()
def evaluate(models: Sequence[nn.Module], batches: Iterable[torch.Tensor], mean: torch.Tensor,
             lm_head: LMHead | None = None) -> list[dict[str, float]]:
    """For each model, token-weighted metrics over every batch (the whole validation set), not a mean of
    batch means, the centred ones about `mean` (the training rows'); with `lm_head`, also the mean
    next-token KL of the head reading the reconstruction. One read of the batches, and one teacher
    pass through the head, serves every model."""
    sums, kl = [None] * len(models), torch.zeros(len(models), dtype=torch.float64)
    for x in batches:
        for i, model in enumerate(models):
            s = reconstruction_sums(x, model(x), mean)
            sums[i] = s if sums[i] is None else sums[i] + s
        if lm_head is not None:  # no next tokens needed (-1: unknown): only the KL is taken
            found = damage_sums(lm_head, x, torch.full((x.shape[0],), -1), dict(enumerate(models)))
            kl += torch.stack([found[i][0] for i in range(len(models))])
    metrics = [metrics_from_sums(s) for s in sums]
    if lm_head is not None:
        for m, k, s in zip(metrics, kl.tolist(), sums):
            m["downstream_kl"] = k / float(s[6])  # s[6]: tokens
    return metrics


def objective_loss(cfg: Config, lm_head: LMHead | None,
                   references: dict[int, tuple[float, float]] | None = None) -> Callable[..., torch.Tensor]:
    """The training loss of `--objective` for each of the compressors, per token [k]: reconstruction mse,
    next-token KL, or mse + kl_weight * KL; for the KL one teacher pass through the head serves them all.
    phase2: `phase2.region_loss` with the references of each D' (`references`), called with the rows' regions."""
    if cfg.objective == "phase2":
        return phase2.region_loss(lm_head, cfg.close_weight, references, phase2.region_codes(read_manifest(cfg.shards_path)))

    def loss(x: torch.Tensor, models: Sequence[nn.Module]) -> torch.Tensor:
        if cfg.objective != "mse":
            kl = grid_kl(lm_head, x, [m.weight for m in models]) / x.shape[0]
            if cfg.objective == "kl":
                return kl
        mse = torch.stack([nn.functional.mse_loss(m(x), x) for m in models])
        return mse if cfg.objective == "mse" else mse + cfg.kl_weight * kl

    return loss


def optimizer_step(models: Sequence[DimensionCompressor], optimizer: torch.optim.Optimizer,
                   loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, cfg: Config, world: int = 1,
                   region: torch.Tensor | None = None) -> torch.Tensor:
    """One step of every compressor in `models` on the rows `x`: their losses [k], backward, and for each
    its gradient averaged over the `world` ranks (as DDP would), clipped, and an AdamW update. The
    compressors share no parameter, so the sum's gradient in each W is that W's own loss's.

    With --orthonormal, Riemannian Adam on the manifold of orthonormal rows (so WᵀW stays a projection,
    what phase 2 needs): the gradient projected onto the tangent space before the update, the rows put
    back onto an orthonormal set after it (the retraction), and Adam's momentum carried to the new
    point's tangent space (vector transport by projection). Adam's moments then never accumulate the
    part of a gradient that only rescales the rows, which the retraction throws away: a KL objective's
    gradient has one, which plain Adam fed back into every later step. `region`: the rows' regions, for a
    loss that weighs them (`--objective phase2`)."""
    losses = loss_fn(x, models) if region is None else loss_fn(x, models, region)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    for model in models:
        w = model.weight
        if world > 1:
            dist.all_reduce(w.grad)
            w.grad /= world
        if cfg.orthonormal:
            w.grad = tangent_part(w, w.grad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()  # a compressor left out of `models` has no gradient: AdamW leaves it as it is
    if cfg.orthonormal:
        for model in models:
            w = model.weight
            orthonormalize_(w)
            momentum = optimizer.state[w]["exp_avg"]
            momentum.copy_(tangent_part(w, momentum))
    return losses.detach()


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


def compile_or_eager(fn: Callable[..., torch.Tensor], enabled: bool) -> Callable[..., torch.Tensor]:
    """`torch.compile(fn)` where compilation works; where the first call fails, eager `fn` (said once)."""
    if not enabled:
        return fn
    compiled = torch.compile(fn)
    state = {"compiled_ok": None}

    def step(*args: Any) -> torch.Tensor:
        if state["compiled_ok"] is False:
            return fn(*args)
        try:
            out = compiled(*args)
        except Exception as e:
            if state["compiled_ok"]:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eagerly", flush=True)
            state["compiled_ok"] = False
            return fn(*args)
        state["compiled_ok"] = True
        return out

    return step


def initial_model(cfg: Config, run: dict[str, Any]) -> DimensionCompressor:
    """Stage 1a: the --init start (orthogonal, PCA, or for a KL objective PCA in the LM head's Fisher
    metric, or PCA's where that is better: `start_basis`); stage 1b starts from the stage 1a weights
    of the same D and D', or for `--objective phase2` from the best closed form the sweep found for
    its regions, which may be those weights (`phase2.start_weight`)."""
    torch.manual_seed(cfg.seed)
    model = DimensionCompressor(run["d_model"], cfg.d_compressed)
    start = cfg.init_checkpoint(cfg.d_compressed)
    if cfg.init != "orthogonal" and not start:
        basis = start_basis(cfg.shards_path, cfg.val_fraction, cfg.seed, cfg.init, cfg.d_compressed)
        with torch.no_grad():  # rows = the top-D' directions (for PCA, the MSE optimum itself, up to a rotation)
            model.weight.copy_(basis.T)
    if start and cfg.objective == "phase2":
        with torch.no_grad():
            model.weight.copy_(phase2.start_weight(cfg.output_dir, cfg.d_compressed))
    elif start:
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


@dataclass
class Width:
    """One D' of a trial: its compressor, its early stopping, its best weights so far and their metrics,
    why it stopped training (None while it trains), and its metrics of the last epoch it trained (what
    a trial resumed with nothing left to train reports again)."""

    cfg: Config  # the trial's settings with this D' as d_compressed
    config: dict[str, Any]  # the same with the run's facts: what its checkpoint and W&B run record
    model: DimensionCompressor
    stopper: EarlyStopping
    best: dict[str, Any] | None = None
    stopped: str | None = None
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.cfg.d_compressed

    def state(self) -> dict[str, Any]:
        """What resumes it: weights, early stopping, best so far, stop reason, last metrics."""
        return {"model": plain_state(self.model), "stopper": dataclasses.asdict(self.stopper), "best": self.best,
                "stopped": self.stopped, "last": self.last}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.stopper, self.best, self.stopped = EarlyStopping(**state["stopper"]), state["best"], state["stopped"]
        self.last = state.get("last", {})  # none in a checkpoint written before they were kept


def asha_cuts(group: str) -> Any:
    """The sweep's record of the widths ASHA stopped (`scheduler.WidthCuts`), None outside a sweep."""
    import ray

    from trm_ray.names import cuts_name

    try:
        return ray.get_actor(cuts_name(group))
    except ValueError:
        return None


ASHA_WAIT_S = 120.0  # how long a trial waits for ASHA to decide on its report before it trains on without


def asha_decision(cuts: Any, trial: str, tokens_seen: int) -> list[int]:
    """The widths of `trial` ASHA has stopped, once it has read the report at `tokens_seen`: waiting for it
    (the report's way through Train's controller and Tune takes about a second) means that a width
    stopped at a milestone trains no epoch past it, however short the epochs."""
    import ray

    deadline = time.monotonic() + ASHA_WAIT_S
    while (cut := ray.get(cuts.of.remote(trial, tokens_seen))) is None:
        if time.monotonic() > deadline:
            print(f"{trial}: ASHA has not decided on the report at {tokens_seen:,} tokens after {ASHA_WAIT_S:g} s; "
                  "training on, its decision applies after the next report", flush=True)
            return []
        time.sleep(0.05)
    return cut


def resumed_cuts(cuts: Any, trial: str, tokens_seen: int, written_by: str | None) -> list[int]:
    """The widths of `trial` ASHA has stopped, up to the report at `tokens_seen` that the trial resumes from:
    its checkpoint was written before ASHA decided on it. Written by this job (a worker replaced, say during
    the wait for that decision), the decision is on its way: wait for it. Written by an earlier job (a
    resumed sweep, whose `WidthCuts` holds the cuts restored from the rungs file), ASHA decided before that
    driver stopped or never will: the report was lost with it, and ASHA decides at the next report."""
    import ray

    if written_by == ray.get_runtime_context().get_job_id():
        return asha_decision(cuts, trial, tokens_seen)
    return ray.get(cuts.of.remote(trial, 0))  # at 0 tokens: every cut it holds, decided or not since


def stop_cut(widths: Sequence[Width], cut: list[int], epoch: int) -> None:
    """Stop the widths ASHA cut after `epoch` epochs."""
    for w in widths:
        if w.stopped is None and w.d in cut:
            w.stopped = "stopped by ASHA"
            print(f"d{w.d}: stopped by ASHA after epoch {epoch}", flush=True)


def agree_on_stops(widths: Sequence[Width], device: torch.device, world: int) -> None:
    """Every rank stops the widths rank 0 stopped (it validates and hears from ASHA), so all train the same ones."""
    if world == 1:
        return
    flags = torch.tensor([float(w.stopped is not None) for w in widths], device=device)
    dist.broadcast(flags, 0)
    for w, flag in zip(widths, flags.tolist()):
        w.stopped = w.stopped or ("stopped on rank 0" if flag else None)


def write_checkpoint(directory: str, widths: Sequence[Width], optimizer: torch.optim.Optimizer, epoch: int,
                     step: int, tokens_seen: int) -> Any:
    """The trial's checkpoint: each d<D'>/compressor.pt that D''s best so far (what the export copies), and the
    whole resumable state, with the job that wrote it (`resumed_cuts` tells a replaced worker by it)."""
    import ray
    import ray.train

    for w in widths:
        if w.best is not None:  # none only when the first epoch already diverged: nothing worth keeping
            save_best(f"{directory}/d{w.d}/{CHECKPOINT_FILE}", w)
    torch.save({"widths": {str(w.d): w.state() for w in widths}, "optimizer": optimizer.state_dict(), "epoch": epoch,
                "step": step, "tokens_seen": tokens_seen, "job": ray.get_runtime_context().get_job_id()},
               f"{directory}/{RESUME_FILE}")
    return ray.train.Checkpoint.from_directory(directory)


def train_loop_per_worker(config: dict[str, Any], train: Any) -> None:
    """One worker's training of every D' of `config`'s grid at one learning rate; `train` is the training
    split's Ray Dataset (each epoch reads its own block order of it, see epoch_rows)."""
    import ray.train
    import ray.train.torch

    cfg, run = trial_config(config)
    quiet_ray_logs()
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()

    widths = []
    for d in cfg.d_values:
        width_cfg = dataclasses.replace(cfg, d_compressed=d)
        widths.append(Width(width_cfg, {**config, "d_compressed": d}, initial_model(width_cfg, run),
                            EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)))
    start_epoch, step, tokens_seen, state = 0, 0, 0, None
    resumed = ray.train.get_checkpoint()
    if resumed:  # a replaced worker, or a restored sweep: continue where the last report left off
        with resumed.as_directory() as d:
            state = torch.load(f"{d}/{RESUME_FILE}", map_location="cpu", weights_only=True)
        for w in widths:
            w.load(state["widths"][str(w.d)])
        start_epoch, step, tokens_seen = state["epoch"], state["step"], state["tokens_seen"]
        print(f"{cfg.trial_label}: resuming after epoch {start_epoch} from {resumed.path}", flush=True)
    # On the worker's device; each step averages the gradients over the ranks itself (optimizer_step).
    ray.train.torch.prepare_model(nn.ModuleList([w.model for w in widths]), parallel_strategy=None)
    optimizer = make_optimizer(nn.ModuleList([w.model for w in widths]), cfg, state["optimizer"] if state else None)
    # Loaded once per worker: what phase 2 decompresses into, so what a KL objective trains against.
    lm_head = load_lm_head(cfg.model_name, device) if cfg.objective != "mse" else None
    regions = cfg.objective == "phase2"  # the loss and the scores weigh phase 2's regions apart
    # Validation scores in float32 like the export and the PCA reference: bf16 logits (what a GPU trains
    # with) would put a noise floor under the small KLs of a wide D', and downstream_efficiency on it.
    score_head = lm_head
    if rank == 0 and lm_head is not None and lm_head.weight.dtype != torch.float32:
        score_head = copy.deepcopy(lm_head).float()
    references = ({d: (run["context_pca_mse"][str(d)], run["close_pca_downstream_kl"][str(d)]) for d in cfg.d_values}
                  if regions else None)
    loss_fn = compile_or_eager(objective_loss(cfg, lm_head, references), cfg.torch_compile)
    rows = cfg.batch_size * cfg.max_seq_length
    total_steps = math.ceil(run["train_tokens"] / world / rows) * cfg.num_epochs
    warmup_steps = max(1, int(cfg.warmup_ratio * total_steps))
    logs = {w.d: tracking(cfg.use_wandb, rank, project=cfg.wandb_project, group=run["group"], name=cfg.wandb_name(w.d),
                          config=w.config, directory=cfg.output_dir) for w in widths}
    cuts = asha_cuts(run["group"]) if rank == 0 else None
    if resumed:
        if cuts is not None:
            stop_cut(widths, resumed_cuts(cuts, cfg.trial_label, tokens_seen, state.get("job")), start_epoch)
        agree_on_stops(widths, device, world)

    val_shard = ray.train.get_dataset_shard("val")
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed).to(device)
    score = cfg.score_metric
    best_keys = (*METRICS, *phase2.METRICS) if regions else METRICS if lm_head is None else (*METRICS, *KL_METRICS)
    codes = phase2.region_codes(read_manifest(cfg.shards_path)) if regions else {}

    def validate(active: list[Width]) -> list[dict[str, float]]:
        """Every active D' on one read of the validation set (a phase-2 objective: each region scored apart too)."""
        models = [w.model.eval() for w in active]
        if regions:
            found = phase2.evaluate_regions(models, hidden_batches(val_shard, rows, device, regions=True), mean, score_head, codes)
            for w, m in zip(active, found):
                phase2.add_scores(m, *references[w.d])
        else:
            found = evaluate(models, hidden_batches(val_shard, rows, device), mean, score_head)
        for w, m in zip(active, found):
            # How close to the best any tied linear compressor of this width can get (1.0 = optimal).
            pca_mse = run["pca_mse"][str(w.d)]
            m.update({"pca_mse": pca_mse, "pca_efficiency": pca_mse / m["mse"],
                      "orthonormality_error": orthonormality_error(w.model.weight)})
            if lm_head is not None and not regions:  # the same ratio for what the LM head reads (> 1: better than PCA)
                pca_kl = run["pca_downstream_kl"][str(w.d)]
                m.update({"pca_downstream_kl": pca_kl, "downstream_efficiency": pca_kl / m["downstream_kl"]})
        return found

    initial: dict[int, dict[str, float]] = {}
    if rank == 0 and not resumed:
        # Where training starts from (1a: PCA or orthogonal, 1b: the 1a weights), scored on this run's
        # validation set. It is the first candidate for the best checkpoint, so a trial never exports
        # anything worse than its start (epoch 0), and epochs must beat it to count as improvements.
        for w, start in zip(widths, validate(widths)):
            initial[w.d] = {f"initial_{k}": v for k, v in start.items()
                            if k not in ("pca_mse", "pca_downstream_kl", "context_pca_mse", "close_pca_downstream_kl")}
            w.best = {"state": plain_state(w.model), **{k: start[k] for k in best_keys}, "epoch": 0}
            w.stopper.update(start[score])
    if resumed and (start_epoch == cfg.num_epochs or all(w.stopped is not None for w in widths)):
        # Resumed after its last epoch, or after all its widths stopped (a worker replaced in the trial's tail, a
        # resumed sweep, a retried trial): nothing to train. Its checkpoint and each width's last metrics are
        # reported again, so the run ends on a report that holds every width (what the export reads).
        print(f"{cfg.trial_label}: nothing left to train after epoch {start_epoch}", flush=True)
        metrics = {"epoch": start_epoch, "resumed_after_epoch": start_epoch, "tokens_seen": tokens_seen,
                   "d_values_training": 0, **{width_key(w.d, k): v for w in widths for k, v in w.last.items()}}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = write_checkpoint(tmp, widths, optimizer, start_epoch, step, tokens_seen) if rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)
    for epoch in range(start_epoch, cfg.num_epochs):
        active = [w for w in widths if w.stopped is None]
        if not active:
            break
        for w in active:
            w.model.train()
        t0, epoch_tokens, loss_sums = time.perf_counter(), 0, torch.zeros(len(active), dtype=torch.float64)
        train_shard = rank_share(epoch_rows(train, cfg, epoch), rank, world)
        for batch in hidden_batches(train_shard, rows, device, shuffle_seed=cfg.seed * 1000 + epoch, regions=regions):
            x, region = batch if regions else (batch, None)
            lr = get_lr(step, total_steps, warmup_steps, cfg.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = optimizer_step([w.model for w in active], optimizer, loss_fn, x, cfg, world, region)
            step += 1
            epoch_tokens += x.shape[0]
            loss_sums += losses.double().cpu() * x.shape[0]
        counts = torch.cat([torch.tensor([float(epoch_tokens)], dtype=torch.float64), loss_sums]).to(device)
        if world > 1:
            dist.all_reduce(counts)
        elapsed = time.perf_counter() - t0
        tokens_seen += int(counts[0])
        metrics: dict[str, Any] = {"epoch": epoch + 1, "resumed_after_epoch": start_epoch, "tokens_seen": tokens_seen,
                                   "tokens_per_s": float(counts[0]) / elapsed, "lr": lr, "d_values_training": len(active)}

        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                for w, m, loss_sum in zip(active, validate(active), counts[1:].tolist()):
                    m = {**initial.pop(w.d, {}), **m, "train_loss": loss_sum / float(counts[0]), "epochs_trained": epoch + 1}
                    w.stopped = epoch_verdict(w, m, epoch, cfg, best_keys)
                    w.last = m
                    metrics.update({width_key(w.d, k): v for k, v in m.items()})
                    logs[w.d].log({**m, "epoch": epoch + 1, "tokens_seen": tokens_seen, "lr": lr})
                    publish({**metrics, **m}, trial=f"d{w.d}-{cfg.trial_label}", sweep=run["group"], stage=cfg.stage)
                # Every report carries the whole resumable state (written before ASHA decides on the report:
                # a trial resumed from it asks for that decision first, `resumed_cuts`).
                checkpoint = write_checkpoint(tmp, widths, optimizer, epoch + 1, step, tokens_seen)
            ray.train.report(metrics, checkpoint=checkpoint)
        if cuts is not None:  # ASHA's decision on this report: each width against its other learning rates
            stop_cut(widths, asha_decision(cuts, cfg.trial_label, tokens_seen), epoch + 1)
        agree_on_stops(widths, device, world)
    if rank == 0:
        for w in widths:
            if w.best is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    save_best(f"{tmp}/{CHECKPOINT_FILE}", w)
                    logs[w.d].log_checkpoint(f"{tmp}/{CHECKPOINT_FILE}", {k: v for k, v in w.best.items() if k != "state"})
            logs[w.d].finish()


def epoch_verdict(w: Width, m: dict[str, Any], epoch: int, cfg: Config, best_keys: tuple[str, ...]) -> str | None:
    """Keep the epoch's weights of `w` if they are its best, and say whether it stops now: diverged, or early
    stopping (`m` gains the reason, `stop_reason`); None when it trains on."""
    score = cfg.score_metric
    # NaN compares false with everything: a NaN epoch must neither become the best nor count as one.
    finite = all(math.isfinite(m[k]) for k in ("mse", score, "train_loss"))
    if finite and (w.best is None or m[score] < w.best[score]):
        w.best = {"state": plain_state(w.model), **{k: m[k] for k in best_keys}, "epoch": epoch + 1}
    if w.best is not None:
        m.update({"best_mse": w.best["mse"], f"best_{score}": w.best[score]})
    reason = None
    if not finite:
        reason = f"diverged: train loss {m['train_loss']}, validation {score} {m[score]}; lower --learning_rate"
    elif cfg.early_stopping and w.stopper.update(m[score]):
        reason = (f"early stopping: validation {score} did not improve by {cfg.early_stopping_min_delta:g} "
                  f"(relative) for {cfg.early_stopping_patience} epochs")
    if reason:
        m["stop_reason"] = reason
        print(f"d{w.d}: {reason}; stopped after epoch {epoch + 1}", flush=True)
    return reason


def save_best(path: str, w: Width) -> None:
    """`w`'s best weights so far in the seed's checkpoint format, with its own D' in the config."""
    save_checkpoint(path, w.best["state"], w.config, w.best[w.cfg.score_metric], {k: v for k, v in w.best.items() if k != "state"})


def make_trainer(config: dict[str, Any], train: Any, val: Any, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for one learning rate (every D'): scaling, data, checkpointing, all in one visible place."""
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
            name=cfg.trial_label,
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


def load_splits(shards_dir: str, val_fraction: float, seed: int, shard_order_seed: int | None = None) -> tuple[Any, Any]:
    """(train, val) Ray Datasets of token rows; validation is whole held-out documents.

    One plain read task per shard, in shard order, or in the order `shard_order_seed` draws
    (reproducible runs either way). Not `read_parquet`:
    it indexes every file's footer on freshly started actors at each pass (5-7 s a pass
    here, before the first row), and the manifest already says which shards there are."""
    import ray.data

    manifest = read_manifest(shards_dir)
    rows = rows_per_block(manifest)
    columns = ["doc_id", "hidden"] + (["region"] if manifest.get("regions") else [])  # stage 1b: what a row is

    def read(val_side: bool):
        def fn(batch: dict[str, np.ndarray]):
            for path in batch["path"]:
                yield from side_tables(str(path), val_fraction, seed, val_side, rows, columns)
        return fn

    paths = ray.data.from_items([{"path": p} for p in shard_paths(shards_dir, manifest)],
                                override_num_blocks=len(manifest["shards"]))
    paths.context.execution_options.preserve_order = True
    if shard_order_seed is not None:  # one block per path: this permutes the reads, streaming stays
        paths = paths.randomize_block_order(seed=shard_order_seed)
    train, val = (paths.map_batches(read(side), batch_size=1, batch_format="numpy") for side in (False, True))
    return train, val
