"""The Ray Train side of a trial: its datasets, its TorchTrainer, and the worker, a thin adapter that hands
`loop.fit` Ray Data batches, a `Comm` over the trial's ranks and a reporter that reports each epoch to Ray
Train with its checkpoint and reads ASHA's cuts back (`WidthCuts`, see `trm_ray.scheduler`). Also each
width's start (`initial_model`) and the objective's loss, which need the references stored beside the shards.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trm_ray import phase2
from trm_ray.cluster import scaling_config
from trm_ray.compressor import DimensionCompressor, load_checkpoint, orthonormality_error
from trm_ray.config import Config
from trm_ray.hidden import stored_hidden
from trm_ray.kl import LMHead, grid_kl
from trm_ray.loop import (Comm, EarlyStopping, Progress, Reporter, Width, compile_or_eager, evaluate, fit, make_optimizer,
                          save_best, stop_cut)
from trm_ray.model import load_lm_head
from trm_ray.names import CHECKPOINT_FILE, KL_METRICS, METRICS, PHASE2_METRICS, RESUME_FILE, width_key
from trm_ray.references import start_basis, start_weight, training_mean
from trm_ray.spec import TrialSpec
from trm_ray.shards import read_manifest, rows_per_block, shard_paths, side_tables
from trm_ray.tracking import publish, tracking


def hidden_batches(iterator: Any, rows: int, device: torch.device, shuffle_seed: int | None = None,
                   regions: bool = False, comm: Comm | None = None) -> Iterator[Any]:
    """Float32 [rows, D] tensors on `device` from a Ray Data iterator of shard rows: sent in the shards' dtype
    (bf16: half the bytes) and converted to float32 there; with `regions`, (rows, each row's region code).
    With `comm`, only this rank's share of each batch (`Comm.part`), cut before anything is decoded or copied.
    On a GPU the rows are copied from pinned memory (the copy overlaps the step: from pageable memory
    `non_blocking` is not asynchronous) and Ray Data prepares the next two batches while one trains."""
    shuffle = {"local_shuffle_buffer_size": 4 * rows, "local_shuffle_seed": shuffle_seed} if shuffle_seed is not None else {}
    gpu = device.type == "cuda"
    for batch in iterator.iter_batches(batch_size=rows, batch_format="pyarrow", prefetch_batches=2 if gpu else 1, **shuffle):
        if comm is not None:
            share = comm.part(batch.num_rows)
            batch = batch.slice(share.start, share.stop - share.start)
        x = stored_hidden(batch["hidden"])
        x = (x.pin_memory() if gpu else x).to(device, non_blocking=True).float()
        yield (x, torch.from_numpy(batch["region"].to_numpy()).to(device)) if regions else x


def epoch_rows(train: Any, cfg: Config, epoch: int, rank: int = 0, world: int = 1) -> Any:
    """This epoch's training rows for `rank` of `world`, their blocks in an order drawn from (seed, epoch): every
    epoch ends its learning-rate decay on other documents, and a resumed epoch reads exactly what the
    uninterrupted one read. Every rank gets an equal share (the same number of steps: each step's gradient
    all-reduce waits for all of them).

    Held in the object store, the blocks are permuted where they are (no data moves) and every rank cuts the
    same blocks at the same rows itself (`Dataset.split`, tasks on the blocks' metadata). Streamed, the shards
    are read in a permuted order (a block shuffle of a streamed dataset would first wait for all of it) and rank
    0 splits them and hands every rank its iterator (`streaming_split`, whose coordinator is an actor started
    every epoch: a process, seconds on a loaded node, that a held dataset does not need)."""
    from ray.data.dataset import MaterializedDataset

    order_seed = cfg.seed * 1000 + epoch
    if isinstance(train, MaterializedDataset):
        rows = train.randomize_block_order(seed=order_seed)
        return rows if world == 1 else rows.split(world, equal=True)[rank]
    rows = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed, shard_order_seed=order_seed)[0]
    if world == 1:
        return rows
    parts = [rows.streaming_split(world, equal=True) if rank == 0 else None]
    dist.broadcast_object_list(parts, src=0)
    return parts[0][rank]


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


def initial_model(cfg: Config, d_model: int) -> DimensionCompressor:
    """Stage 1a: the --init start (orthogonal, PCA, or for a KL objective PCA in the LM head's Fisher
    metric, or PCA's where that is better: `start_basis`); stage 1b starts from the stage 1a weights
    of the same D and D', or for `--objective phase2` from the best closed form the sweep found for
    its regions, which may be those weights (`references.start_weight`)."""
    torch.manual_seed(cfg.seed)
    model = DimensionCompressor(d_model, cfg.d_compressed)
    start = cfg.init_checkpoint(cfg.d_compressed)
    if cfg.init != "orthogonal" and not start:
        basis = start_basis(cfg.shards_path, cfg.val_fraction, cfg.seed, cfg.init, cfg.d_compressed)
        with torch.no_grad():  # rows = the top-D' directions (for PCA, the MSE optimum itself, up to a rotation)
            model.weight.copy_(basis.T)
    if start and cfg.objective == "phase2":
        with torch.no_grad():
            model.weight.copy_(start_weight(cfg.output_dir, cfg.d_compressed))
    elif start:
        ckpt = load_checkpoint(start, d_model=d_model, d_compressed=cfg.d_compressed)
        model.load_state_dict(ckpt["compressor"])
    return model


def quiet_ray_logs() -> None:
    """Keep the sweep's log readable: Ray Train logs each report's whole metrics dict at INFO (Tune's
    table, the summary and W&B show them), and Ray Data a summary of every pass over the data
    (two a trial every epoch; the dashboard's Ray Data view keeps them)."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(("train/v2/_internal/execution/context.py", "train.v2._internal.execution.context")):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


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


def resume(widths: Sequence[Width], cfg: Config) -> tuple[Progress | None, dict[str, Any] | None]:
    """Where the trial left off, its widths loaded from its latest checkpoint (a replaced worker, a restored
    sweep), with the whole saved state; (None, None) for a trial that starts now."""
    import ray.train

    resumed = ray.train.get_checkpoint()
    if not resumed:
        return None, None
    with resumed.as_directory() as d:
        state = torch.load(f"{d}/{RESUME_FILE}", map_location="cpu", weights_only=True)
    for w in widths:
        w.load(state["widths"][str(w.d)])
    print(f"{cfg.trial_label}: resuming after epoch {state['epoch']} from {resumed.path}", flush=True)
    return Progress(state["epoch"], state["step"], state["tokens_seen"]), state


def best_keys(cfg: Config) -> tuple[str, ...]:
    """The metrics a width's best checkpoint keeps: the reconstruction's, and what the objective is scored on."""
    if cfg.objective == "phase2":
        return (*METRICS, *PHASE2_METRICS)
    return METRICS if cfg.objective == "mse" else (*METRICS, *KL_METRICS)


def validation(spec: TrialSpec, references: dict[int, tuple[float, float]] | None, val_shard: Any,
               lm_head: LMHead | None, comm: Comm, rows: int) -> Callable[[list[Width]], list[dict[str, float]]]:
    """The scoring of every active D' on one read of the validation set (a phase-2 objective: each region
    scored apart too), beside the PCA references of the same width. Every rank reads the validation blocks and
    scores its share of each batch (`Comm.part`); the sums are added over the ranks (`loop.evaluate`)."""
    cfg, regions = spec.cfg, references is not None
    # Validation scores in float32 like the export and the PCA reference: bf16 logits (what a GPU trains
    # with) would put a noise floor under the small KLs of a wide D', and downstream_efficiency on it.
    score_head = lm_head
    if lm_head is not None and lm_head.weight.dtype != torch.float32:
        score_head = copy.deepcopy(lm_head).float()
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed).to(comm.device)
    codes = phase2.region_codes(read_manifest(cfg.shards_path)) if regions else {}

    def validate(active: list[Width]) -> list[dict[str, float]]:
        models = [w.model.eval() for w in active]
        if regions:
            found = phase2.evaluate_regions(models, hidden_batches(val_shard, rows, comm.device, regions=True, comm=comm),
                                            mean, score_head, codes, comm)
            for w, m in zip(active, found):
                phase2.add_scores(m, *references[w.d])
        else:
            found = evaluate(models, hidden_batches(val_shard, rows, comm.device, comm=comm), mean, score_head, comm)
        for w, m in zip(active, found):
            # How close to the best any tied linear compressor of this width can get (1.0 = optimal).
            pca_mse = spec.references["pca_mse"][w.d]
            m.update({"pca_mse": pca_mse, "pca_efficiency": pca_mse / m["mse"],
                      "orthonormality_error": orthonormality_error(w.model.weight)})
            if lm_head is not None and not regions:  # the same ratio for what the LM head reads (> 1: better than PCA)
                pca_kl = spec.references["pca_downstream_kl"][w.d]
                m.update({"pca_downstream_kl": pca_kl, "downstream_efficiency": pca_kl / m["downstream_kl"]})
        return found

    return validate


class TrainReporter(Reporter):
    """The loop's reports through Ray: W&B and Ray's gauges for each width (rank 0), every epoch's report to
    Ray Train with the whole resumable state as its checkpoint, and ASHA's decision on it read back."""

    def __init__(self, spec: TrialSpec, widths: Sequence[Width], rank: int):
        cfg = spec.cfg
        self.cfg, self.group, self.rank = cfg, spec.group, rank
        self.logs = {w.d: tracking(cfg.use_wandb, rank, project=cfg.wandb_project, group=spec.group,
                                   name=cfg.wandb_name(w.d), config=w.config, directory=cfg.output_dir) for w in widths}
        self.cuts = asha_cuts(spec.group) if rank == 0 else None

    def width(self, w: Width, metrics: dict[str, Any], epoch: dict[str, Any]) -> None:
        self.logs[w.d].log({**metrics, "epoch": epoch["epoch"], "tokens_seen": epoch["tokens_seen"], "lr": epoch["lr"]})
        publish({**epoch, **metrics}, trial=f"d{w.d}-{self.cfg.trial_label}", sweep=self.group, stage=self.cfg.stage)

    def report(self, metrics: dict[str, Any], widths: Sequence[Width], optimizer: torch.optim.Optimizer,
               progress: Progress) -> None:
        """Every report carries the whole resumable state (written before ASHA decides on the report: a trial
        resumed from it asks for that decision first, `resumed_cuts`)."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = (write_checkpoint(tmp, widths, optimizer, progress.epoch, progress.step, progress.tokens_seen)
                          if self.rank == 0 else None)
            ray.train.report(metrics, checkpoint=checkpoint)

    def epoch(self, metrics: dict[str, Any], widths: Sequence[Width], optimizer: torch.optim.Optimizer,
              progress: Progress) -> list[int]:
        self.report(metrics, widths, optimizer, progress)
        # ASHA's decision on this report: each width against its other learning rates.
        return asha_decision(self.cuts, self.cfg.trial_label, progress.tokens_seen) if self.cuts is not None else []

    def finish(self, widths: Sequence[Width]) -> None:
        if self.rank != 0:
            return
        for w in widths:
            if w.best is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    save_best(f"{tmp}/{CHECKPOINT_FILE}", w)
                    self.logs[w.d].log_checkpoint(f"{tmp}/{CHECKPOINT_FILE}", {k: v for k, v in w.best.items() if k != "state"})
            self.logs[w.d].finish()


def train_loop_per_worker(config: dict[str, Any], train: Any, val: Any) -> None:
    """One worker's training of every D' of `config`'s grid at one learning rate (`loop.fit`), fed from Ray:
    `train` and `val` are the split's Ray Datasets (each epoch reads its own block order of the training rows,
    see epoch_rows; every rank reads the validation rows and scores its share, see validation), and reports,
    checkpoints and ASHA's cuts go through Ray Train."""
    import ray.train
    import ray.train.torch

    spec = TrialSpec.from_flat(config)
    cfg = spec.cfg
    quiet_ray_logs()
    ctx = ray.train.get_context()
    comm = Comm(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    widths = []
    for d in cfg.d_values:
        width_cfg = dataclasses.replace(cfg, d_compressed=d)
        widths.append(Width(width_cfg, {**config, "d_compressed": d}, initial_model(width_cfg, spec.d_model),
                            EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)))
    start, state = resume(widths, cfg)
    # On the worker's device; each step averages the gradients over the ranks itself (optimizer_step).
    ray.train.torch.prepare_model(nn.ModuleList([w.model for w in widths]), parallel_strategy=None)
    optimizer = make_optimizer(nn.ModuleList([w.model for w in widths]), cfg, state["optimizer"] if state else None)
    # Loaded once per worker: what phase 2 decompresses into, so what a KL objective trains against.
    lm_head = load_lm_head(cfg.model_name, comm.device) if cfg.objective != "mse" else None
    regions = cfg.objective == "phase2"  # the loss and the scores weigh phase 2's regions apart
    references = ({d: (spec.references["context_pca_mse"][d], spec.references["close_pca_downstream_kl"][d])
                   for d in cfg.d_values} if regions else None)
    loss_fn = compile_or_eager(objective_loss(cfg, lm_head, references), cfg.torch_compile)
    rows = cfg.batch_size * cfg.max_seq_length
    reporter = TrainReporter(spec, widths, comm.rank)
    if start is not None:
        if reporter.cuts is not None:
            stop_cut(widths, resumed_cuts(reporter.cuts, cfg.trial_label, start.tokens_seen, state.get("job")), start.epoch)
        comm.agree_on_stops(widths)
        if start.epoch == cfg.num_epochs or all(w.stopped is not None for w in widths):
            # Resumed after its last epoch, or after all its widths stopped (a worker replaced in the trial's tail, a
            # resumed sweep, a retried trial): nothing to train. Its checkpoint and each width's last metrics are
            # reported again, so the run ends on a report that holds every width (what the export reads).
            print(f"{cfg.trial_label}: nothing left to train after epoch {start.epoch}", flush=True)
            reporter.report({"epoch": start.epoch, "resumed_after_epoch": start.epoch, "tokens_seen": start.tokens_seen,
                            "d_values_training": 0, **{width_key(w.d, k): v for w in widths for k, v in w.last.items()}},
                           widths, optimizer, start)

    def batches(epoch: int) -> Iterator[Any]:
        return hidden_batches(epoch_rows(train, cfg, epoch, comm.rank, comm.world), rows, comm.device,
                              shuffle_seed=cfg.seed * 1000 + epoch, regions=regions)

    validate = validation(spec, references, val, lm_head, comm, rows)
    fit(widths, optimizer, loss_fn, batches, validate, cfg, math.ceil(spec.train_tokens / comm.world / rows) * cfg.num_epochs,
        best_keys(cfg), reporter, comm, start)


def make_trainer(config: dict[str, Any], train: Any, val: Any, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for one learning rate (every D'): scaling, data, checkpointing, all in one visible place."""
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = TrialSpec.from_flat(config)
    cfg = spec.cfg
    # The loop reads both datasets itself, not through Train's ingest: each epoch the training rows in a
    # block order drawn from (seed, epoch) + a seeded shuffle buffer, an order that changes every epoch yet is
    # the same on every run, so a resumed or recompiled run can be compared with an uninterrupted one
    # (epoch_rows); the validation rows whole on every rank, each scoring its share of every batch (`validation`;
    # Ray Data's equal split would drop rows), which every rank reads in the same order (load_splits sets
    # preserve_order on the datasets' context).
    return TorchTrainer(
        functools.partial(train_loop_per_worker, train=train, val=val),
        train_loop_config=config,
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.trial_label,
            storage_path=spec.train_storage,
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
