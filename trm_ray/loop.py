"""The training loop on rows in memory: every D' of a grid at one learning rate, on batches it is handed.

Reads top to bottom: the start scored, then each epoch's steps, validation, verdicts and report. Every D'
trains on the same batches: each batch (and, for a KL objective, its teacher logits) serves all of them. Each
D' keeps its own early stopping, best weights and checkpoint, and stops on its own (early stopping,
divergence, or a cut the reporter passes on). Nothing here knows Ray: the Ray Train worker
(`trm_ray.train`) hands `fit` its Ray Data batches, a `Comm` over its ranks and a reporter that reports,
checkpoints and reads ASHA's cuts; a test hands it tensors, one process and a reporter that records.
Validation is split over the ranks, each scoring its share of every batch, and their sums are added before any
metric is taken: the metrics are the whole held-out set's whatever the number of workers, and no rank waits
while another scores it all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trm_ray.compressor import (RECONSTRUCTION_SUMS, TOKENS, DimensionCompressor, metrics_from_sums, plain_state,
                                reconstruction_sums, retract_, save_checkpoint, tangent_part)
from trm_ray.config import Config
from trm_ray.kl import LMHead, kl_sums
from trm_ray.names import width_key


@dataclass(frozen=True)
class Comm:
    """The ranks that train one trial together: gradients averaged, counts summed and rank 0's stops
    followed over torch.distributed; with one rank (the default) every call is a no-op."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def average_grads_(self, params: Sequence[torch.Tensor]) -> None:
        """Each parameter's gradient averaged over the ranks, in one all-reduce of them all laid end to end
        (one collective a step, not one per width)."""
        if self.world == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))

    def summed(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def part(self, n: int) -> slice:
        """This rank's contiguous share of `n` rows: validation splits every batch over the ranks, whose sums
        `summed` then adds up, so each rank scores about 1/world of the rows and the metrics stay the whole set's."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def agree_on_stops(self, widths: Sequence[Width]) -> None:
        """Every rank stops the widths rank 0 stopped (it validates and hears from ASHA), so all train the same ones."""
        if self.world == 1:
            return
        flags = torch.tensor([float(w.stopped is not None) for w in widths], device=self.device)
        dist.broadcast(flags, 0)
        for w, flag in zip(widths, flags.tolist()):
            w.stopped = w.stopped or ("stopped on rank 0" if flag else None)


ONE_PROCESS = Comm()


@dataclass
class Progress:
    """How far a trial is: epochs finished, optimizer steps taken, training tokens seen (all ranks)."""

    epoch: int = 0
    step: int = 0
    tokens_seen: int = 0


class Reporter:
    """Where `fit` sends what it measured; this one keeps nothing (a run in memory needs no record).
    Only rank 0 calls `width`; every rank calls `epoch` and `finish`."""

    def width(self, w: Width, metrics: dict[str, Any], epoch: dict[str, Any]) -> None:
        """Width `w`'s validation `metrics` of an epoch (`epoch`: the trial's report so far)."""

    def epoch(self, metrics: dict[str, Any], widths: Sequence[Width], optimizer: torch.optim.Optimizer,
              progress: Progress) -> list[int]:
        """The trial's report after an epoch; returns the widths to stop now (ASHA's cuts)."""
        return []

    def finish(self, widths: Sequence[Width]) -> None:
        """The trial is over: each width's best weights are final."""


def fit(widths: Sequence[Width], optimizer: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor],
        batches: Callable[[int], Iterable[Any]], validate: Callable[[list[Width]], list[dict[str, float]]],
        cfg: Config, total_steps: int, best_keys: tuple[str, ...], reporter: Reporter = Reporter(),
        comm: Comm = ONE_PROCESS, start: Progress | None = None) -> Progress:
    """Train `widths` from `start` (None: from scratch, the start scored first) through cfg.num_epochs epochs
    of `batches(epoch)` (row tensors, or (rows, their regions) for a loss that weighs regions), with
    `validate` scoring the widths still training after each epoch (on every rank, each its share of the
    validation rows: every rank gets the same metrics; rank 0 decides and reports)."""
    initial = score_start(widths, validate, cfg, best_keys) if start is None else {}
    progress = start or Progress()
    resumed_after = progress.epoch
    step = Stepper(optimizer, loss_fn, cfg, total_steps, comm, progress.step)
    for epoch in range(progress.epoch, cfg.num_epochs):
        active = [w for w in widths if w.stopped is None]
        if not active:
            break
        for w in active:
            w.model.train()
        t0, epoch_tokens, loss_sums = time.perf_counter(), 0, torch.zeros(len(active), dtype=torch.float64)
        for batch in batches(epoch):
            x, region = batch if isinstance(batch, tuple) else (batch, None)
            losses = step([w.model for w in active], x, region)
            epoch_tokens += x.shape[0]
            loss_sums += losses.double().cpu() * x.shape[0]
        counts = comm.summed(torch.cat([torch.tensor([float(epoch_tokens)], dtype=torch.float64), loss_sums]))
        elapsed = time.perf_counter() - t0
        progress = Progress(epoch + 1, step.step, progress.tokens_seen + int(counts[0]))
        metrics: dict[str, Any] = {"epoch": epoch + 1, "resumed_after_epoch": resumed_after,
                                   "tokens_seen": progress.tokens_seen, "tokens_per_s": float(counts[0]) / elapsed,
                                   "lr": step.lr, "d_values_training": len(active)}
        t0 = time.perf_counter()
        found = validate(active)
        metrics["validation_s"] = time.perf_counter() - t0  # this rank's share of every batch, and the all-reduce
        if comm.rank == 0:
            for w, m, loss_sum in zip(active, found, counts[1:].tolist()):
                m = {**initial.pop(w.d, {}), **m, "train_loss": loss_sum / float(counts[0]), "epochs_trained": epoch + 1}
                w.stopped = epoch_verdict(w, m, epoch, cfg, best_keys)
                w.last = m
                metrics.update({width_key(w.d, k): v for k, v in m.items()})
                reporter.width(w, m, metrics)
        stop_cut(widths, reporter.epoch(metrics, widths, optimizer, progress), epoch + 1)
        comm.agree_on_stops(widths)
    reporter.finish(widths)
    return progress


@dataclass
class Stepper:
    """Optimizer steps on the schedule: step n at `get_lr`'s learning rate (warm-up over cfg.warmup_ratio of
    `total_steps`, then cosine decay), one `optimizer_step` of the compressors it is given."""

    optimizer: torch.optim.Optimizer
    loss_fn: Callable[..., torch.Tensor]
    cfg: Config
    total_steps: int
    comm: Comm = ONE_PROCESS
    step: int = 0  # steps taken (before this one: a resumed trial's)
    lr: float = 0.0  # the last step's learning rate

    def __call__(self, models: Sequence[DimensionCompressor], x: torch.Tensor,
                 region: torch.Tensor | None = None) -> torch.Tensor:
        warmup_steps = max(1, int(self.cfg.warmup_ratio * self.total_steps))
        self.lr = get_lr(self.step, self.total_steps, warmup_steps, self.cfg.learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        losses = optimizer_step(models, self.optimizer, self.loss_fn, x, self.cfg, self.comm, region)
        self.step += 1
        return losses


REFERENCE_KEYS = ("pca_mse", "pca_downstream_kl", "context_pca_mse", "close_pca_downstream_kl")


def score_start(widths: Sequence[Width], validate: Callable[[list[Width]], list[dict[str, float]]], cfg: Config,
                best_keys: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """Where training starts from (1a: PCA or orthogonal, 1b: the 1a weights), scored on the validation set:
    the first candidate for each width's best checkpoint, so a trial never exports anything worse than its
    start (epoch 0), and epochs must beat it to count as improvements. Returns each width's `initial_*`
    metrics, which its first epoch's report carries."""
    initial = {}
    for w, start in zip(widths, validate(list(widths))):
        initial[w.d] = {f"initial_{k}": v for k, v in start.items() if k not in REFERENCE_KEYS}
        w.best = {"state": plain_state(w.model), **{k: start[k] for k in best_keys}, "epoch": 0}
        w.stopper.update(start[cfg.score_metric])
    return initial


def get_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to `peak_lr`, then cosine decay to zero at `total_steps`.

    Decaying all the way matters here: the last directions of a wide D' carry little variance,
    and minibatch noise at a 10% floor kept them measurably off the PCA optimum."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(models: Sequence[DimensionCompressor], batches: Iterable[torch.Tensor], mean: torch.Tensor,
             lm_head: LMHead | None = None, comm: Comm = ONE_PROCESS) -> list[dict[str, float]]:
    """For each model, token-weighted metrics over every batch (the whole validation set), not a mean of
    batch means, the centred ones about `mean` (the training rows'); with `lm_head`, also the mean
    next-token KL of the head reading the reconstruction. One read of the batches, and one teacher
    pass through the head, serves every model. `batches`: this rank's share of the rows (`Comm.part`);
    the sums of all ranks are added before any metric is taken, so every rank gets the whole set's."""
    terms = RECONSTRUCTION_SUMS + (lm_head is not None)
    sums = torch.zeros(len(models), terms, dtype=torch.float64, device=comm.device)
    for x in batches:
        sums[:, :RECONSTRUCTION_SUMS] += torch.stack([reconstruction_sums(x, m(x), mean) for m in models]).to(sums.device)
        if lm_head is not None:
            sums[:, RECONSTRUCTION_SUMS] += kl_sums(lm_head, x, models).to(sums.device)
    metrics = []
    for s in comm.summed(sums).cpu():
        m = metrics_from_sums(s[:RECONSTRUCTION_SUMS])
        if lm_head is not None:
            m["downstream_kl"] = float(s[RECONSTRUCTION_SUMS] / s[TOKENS])
        metrics.append(m)
    return metrics


def optimizer_step(models: Sequence[DimensionCompressor], optimizer: torch.optim.Optimizer,
                   loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, cfg: Config, comm: Comm | None = None,
                   region: torch.Tensor | None = None) -> torch.Tensor:
    """One step of every compressor in `models` on the rows `x`: their losses [k], backward, and for each
    its gradient averaged over the ranks of `comm` (as DDP would), clipped, and an AdamW update. The
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
    (comm or ONE_PROCESS).average_grads_([m.weight for m in models])
    for model in models:
        w = model.weight
        if cfg.orthonormal:
            w.grad = tangent_part(w, w.grad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()  # a compressor left out of `models` has no gradient: AdamW leaves it as it is
    if cfg.orthonormal:
        for model in models:
            retract_(model.weight, optimizer)
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


def make_optimizer(model: nn.Module, cfg: Config, saved: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters, with a saved state loaded. Call it after the model is on its
    device (`prepare_model`): loading moves Adam's moments to their parameter's device and dtype,
    whereas moving the model afterwards leaves them behind, and the first step on a GPU fails."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved)
    return optimizer


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


def stop_cut(widths: Sequence[Width], cut: list[int], epoch: int) -> None:
    """Stop the widths ASHA cut after `epoch` epochs."""
    for w in widths:
        if w.stopped is None and w.d in cut:
            w.stopped = "stopped by ASHA"
            print(f"d{w.d}: stopped by ASHA after epoch {epoch}", flush=True)


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
