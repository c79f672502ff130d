"""`loop.fit` on rows in memory: one process, no Ray, a reporter that records (what the Ray Train worker
feeds it from Ray Data, its ranks and Ray Train instead)."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
from torch import nn

from trm_ray.compressor import DimensionCompressor, Phase1Config, orthonormality_error, read_checkpoint
from trm_ray.config import make_config
from trm_ray.loop import EarlyStopping, Progress, Reporter, Width, compile_or_eager, evaluate, fit, make_optimizer, save_best
from trm_ray.names import METRICS
from trm_ray.train import objective_loss
from trm_ray.pca import eigen, moment_sums, pca_summary, pca_val_sums

D, ROWS = 32, 64


def rows(seed: int, batches: int, dim: int = D, per_batch: int = ROWS) -> list[torch.Tensor]:
    """Gaussian rows with a decaying scale per dimension: a subspace worth finding."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(per_batch, dim, generator=gen) * torch.logspace(0.5, -1.5, dim) for _ in range(batches)]


TRAIN, VAL = rows(0, 6), rows(1, 2)
CFG = make_config({"init": "orthogonal", "learning_rate": 0.02, "num_epochs": 4, "sweep": True, "sweep_d_values": [4, 8],
                   "early_stopping_patience": 10})


def mse(x: torch.Tensor, models: list[nn.Module]) -> torch.Tensor:
    return torch.stack([nn.functional.mse_loss(m(x), x) for m in models])


def validate(active: list[Width]) -> list[dict[str, float]]:
    found = evaluate([w.model.eval() for w in active], VAL, torch.cat(TRAIN).double().mean(0))
    for w, m in zip(active, found):
        m["orthonormality_error"] = orthonormality_error(w.model.weight)
    return found


class Recorder(Reporter):
    def __init__(self, cut: dict[int, list[int]] | None = None):
        self.reports, self.cut, self.finished = [], cut or {}, False

    def epoch(self, metrics, widths, optimizer, progress):
        self.reports.append(dict(metrics))
        return self.cut.get(progress.epoch, [])

    def finish(self, widths):
        self.finished = True


def widths(cfg=CFG) -> list[Width]:
    out = []
    for d in cfg.d_values:
        torch.manual_seed(cfg.seed)
        width_cfg = dataclasses.replace(cfg, d_compressed=d)
        out.append(Width(width_cfg, {"d_compressed": d}, DimensionCompressor(D, d),
                         EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)))
    return out


def run(cfg=CFG, reporter=None, epochs=None):
    """A trial of `cfg` on TRAIN; with `epochs`, interrupted after that many (its schedule still cfg's)."""
    trained = widths(cfg)
    optimizer = make_optimizer(nn.ModuleList([w.model for w in trained]), cfg)
    reporter = reporter or Recorder()
    progress = fit(trained, optimizer, mse, lambda epoch: TRAIN, validate, dataclasses.replace(cfg, num_epochs=epochs or cfg.num_epochs),
                   len(TRAIN) * cfg.num_epochs, METRICS, reporter)
    return trained, optimizer, reporter, progress


def test_a_seeded_run_in_memory_follows_its_pinned_loss_curve():
    _, _, reporter, progress = run()
    assert progress == Progress(epoch=4, step=24, tokens_seen=4 * 6 * ROWS)
    curve = [[r[f"d{d}/train_loss"] for d in (4, 8)] for r in reporter.reports]
    for epoch, (found, pinned) in enumerate(zip(curve, PINNED_CURVE, strict=True)):
        assert found == pytest.approx(pinned, rel=1e-5), f"epoch {epoch + 1}"
    assert reporter.finished and [r["epoch"] for r in reporter.reports] == [1, 2, 3, 4]


# Each epoch's mean training loss of D' = 4 and 8 (torch 2.13, CPU, one thread or more: the sums are small).
PINNED_CURVE = [[0.915763, 0.718533], [0.655038, 0.357636], [0.553923, 0.265247], [0.521927, 0.242061]]


def test_the_start_is_scored_first_and_the_first_report_carries_its_scores():
    _, _, reporter, _ = run(dataclasses.replace(CFG, learning_rate=0.0))
    first, second = reporter.reports[:2]
    assert first["d4/initial_mse"] == pytest.approx(first["d4/mse"], rel=1e-6)  # lr 0: only the retraction's rounding
    assert first["d4/best_mse"] <= first["d4/initial_mse"]  # the start was the first candidate
    assert "d4/initial_mse" not in second


def test_a_width_the_reporter_cuts_stops_and_the_others_train_on():
    trained, _, reporter, _ = run(reporter=Recorder(cut={2: [4]}))
    assert [r["d_values_training"] for r in reporter.reports] == [2, 2, 1, 1]
    assert "d4/mse" not in reporter.reports[2] and trained[0].stopped == "stopped by ASHA"


def test_a_run_resumed_after_an_epoch_ends_where_the_uninterrupted_one_does():
    whole, _, _, _ = run()
    first, optimizer, _, progress = run(epochs=1)
    resumed = copy.deepcopy(first)
    state = copy.deepcopy(optimizer.state_dict())
    optimizer = make_optimizer(nn.ModuleList([w.model for w in resumed]), CFG, state)
    fit(resumed, optimizer, mse, lambda epoch: TRAIN, validate, CFG, len(TRAIN) * CFG.num_epochs, METRICS, Recorder(),
        start=progress)
    for a, b in zip(whole, resumed):
        torch.testing.assert_close(b.model.weight, a.model.weight, rtol=0, atol=0)


def test_a_trial_on_a_plateau_stops_after_patience_epochs_and_says_why():
    # learning_rate 0: the weights never move, so validation mse is flat from epoch 1.
    trained, _, reporter, _ = run(dataclasses.replace(CFG, learning_rate=0.0, num_epochs=10, early_stopping_patience=2))
    last = reporter.reports[-1]
    assert last["epoch"] == 2  # the start (epoch 0) sets the best, epochs 1 and 2 do not beat it
    for w in trained:
        assert "early stopping" in last[f"d{w.d}/stop_reason"]


def pca_trial(cfg, train, val):
    """A trial of `cfg` from the PCA start of `train`, validated as the Ray Train worker does: each width's
    metrics beside the PCA limit of its D' on `val` (pca_mse, pca_efficiency) and its orthonormality error."""
    x = torch.cat(train).double()
    evals, evecs = eigen((x.T @ x).numpy())
    mean = x.mean(0)
    limit = pca_summary(moment_sums(x), evals, evecs, pca_val_sums(torch.cat(val).double(), evecs, mean.numpy()))["pca_mse"]
    trained = []
    for d in cfg.d_values:
        model = DimensionCompressor(x.shape[1], d)
        with torch.no_grad():
            model.weight.copy_(torch.tensor(evecs[:, :d].T))
        trained.append(Width(dataclasses.replace(cfg, d_compressed=d), {"d_compressed": d}, model,
                             EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)))

    def validate_pca(active):
        found = evaluate([w.model.eval() for w in active], val, mean)
        for w, m in zip(active, found):
            m.update({"pca_mse": limit[w.d], "pca_efficiency": limit[w.d] / m["mse"],
                      "orthonormality_error": orthonormality_error(w.model.weight)})
        return found

    reporter = Recorder()
    optimizer = make_optimizer(nn.ModuleList([w.model for w in trained]), cfg)
    fit(trained, optimizer, mse, lambda epoch: train, validate_pca, cfg, len(train) * cfg.num_epochs, METRICS, reporter)
    return trained, reporter


def test_pca_init_reaches_pca_efficiency_099_in_its_first_epoch():
    # The start is already optimal: a small learning rate keeps Adam from wandering off it.
    cfg = make_config({"d_compressed": 16, "init": "pca", "num_epochs": 1, "learning_rate": 0.001})
    _, reporter = pca_trial(cfg, rows(0, 16, dim=64, per_batch=256), rows(1, 4, dim=64, per_batch=256))
    m = reporter.reports[-1]
    assert m["epoch"] == 1
    assert m["d16/pca_efficiency"] >= 0.99
    assert m["d16/initial_pca_efficiency"] == pytest.approx(1.0, abs=1e-6)


def test_the_defaults_reach_the_pca_limit_at_the_widest_d_prime_with_orthonormal_rows(tmp_path):
    defaults = make_config({"d_compressed": 32})  # of 64: the widest D' of the session's sweep, at its hidden size
    assert (defaults.init, defaults.orthonormal) == ("pca", True)
    trained, reporter = pca_trial(defaults, rows(0, 16, dim=64, per_batch=256), rows(1, 4, dim=64, per_batch=256))
    [widest] = trained
    save_best(str(tmp_path / "compressor.pt"), widest)
    best = read_checkpoint(tmp_path / "compressor.pt")
    # The last trained epoch's own metrics: the best candidates include the PCA start itself.
    last = widest.last
    assert widest.d == 32 and (last["epochs_trained"] == defaults.num_epochs or "early stopping" in last["stop_reason"])
    assert last["pca_mse"] / last["mse"] >= 0.995
    assert last["orthonormality_error"] <= 1e-6
    assert best["best_metrics"]["orthonormality_error"] == pytest.approx(orthonormality_error(best["compressor"]["compress.weight"]), abs=1e-9)


def test_compiled_and_eager_training_give_the_same_metrics(tmp_path, monkeypatch):
    cfg = dataclasses.replace(CFG, sweep=False, d_compressed=16, num_epochs=2)
    found = {}
    for compiled in (False, True):  # the worker's loss: the objective's, through compile_or_eager
        trained = widths(cfg)
        reporter = Recorder()
        fit(trained, make_optimizer(nn.ModuleList([w.model for w in trained]), cfg),
            compile_or_eager(objective_loss(cfg, None), compiled), lambda epoch: TRAIN, validate, cfg,
            len(TRAIN) * cfg.num_epochs, METRICS, reporter)
        found[compiled] = (reporter.reports[-1], trained[0])
    (eager, _), (compiled, width) = found[False], found[True]
    for key in ("d16/mse", "d16/cosine_similarity", "d16/train_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3), key  # fused kernels round differently
    save_best(str(tmp_path / "compressor.pt"), width)
    # Read as LLM-TRM reads it (its config class bound to __main__.Phase1Config), without trm_ray's loader.
    monkeypatch.setattr(sys.modules["__main__"], "Phase1Config", Phase1Config, raising=False)
    state = torch.load(tmp_path / "compressor.pt", weights_only=False)["compressor"]
    assert list(state) == ["compress.weight"]  # LLM-TRM's name, no _orig_mod. / module. prefixes


def sharded_validation(rank: int, world: int, port: int, out: str) -> None:
    """Score two compressors on the same batches with `Comm.part` of each batch on this rank (as the Train
    worker's validation does): `loop.evaluate` with an LM head and `phase2.evaluate_regions`; rank 0 saves
    the metrics, every rank how many rows it scored."""
    import torch.distributed as dist

    from trm_ray.kl import LMHead
    from trm_ray.loop import Comm
    from trm_ray.phase2 import evaluate_regions

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm, gen = Comm(rank, world), torch.Generator().manual_seed(3)
    batches = rows(5, 3, per_batch=101)  # rows a batch not divisible by the ranks
    regions = [torch.randint(0, 3, (len(x),), generator=gen) for x in batches]  # 0 other, 1 context, 2 close
    head = LMHead(torch.randn(50, D, generator=gen), None)
    torch.manual_seed(0)
    models = [DimensionCompressor(D, d).eval() for d in (4, 8)]
    mean = torch.cat(batches).mean(0)
    scored = []

    def share(x: torch.Tensor) -> torch.Tensor:
        scored.append(len(x[comm.part(len(x))]))
        return x[comm.part(len(x))]

    plain = evaluate(models, (share(x) for x in batches), mean, head, comm)
    parts = [(x[comm.part(len(x))], r[comm.part(len(r))]) for x, r in zip(batches, regions)]
    by_region = evaluate_regions(models, parts, mean, head, {"context": 1, "close": 2}, comm)
    torch.save({"plain": plain, "regions": by_region, "rows": sum(scored)}, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def test_validation_split_over_two_ranks_gives_the_one_process_metrics_with_each_rank_scoring_half_the_rows(tmp_path):
    import socket

    import torch.multiprocessing as mp

    sharded_validation(0, 1, 0, str(tmp_path / "one"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(sharded_validation, args=(2, port, str(tmp_path / "two")), nprocs=2)
    one = torch.load(tmp_path / "one.0")
    two = [torch.load(tmp_path / f"two.{r}") for r in (0, 1)]
    assert one["rows"] == 303 and [t["rows"] for t in two] == [150, 153]  # each rank about half of every batch
    for kind in ("plain", "regions"):
        for m1, m2 in zip(one[kind], two[0][kind]):
            assert m1.keys() == m2.keys() and m1["mse"] > 0
            assert m1.get("downstream_kl", m1.get("close_downstream_kl")) > 1e-4  # a KL was scored, not skipped
            for key in m1:
                # The KL is float32 per row (p (log p - log q), a difference of near-equal numbers), computed on
                # batches of other shapes on one rank than on two: 8.5e-6 apart in one run of twenty; the
                # reconstruction metrics agreed to 1e-6 in every run.
                kl_based = "kl" in key or key in ("downstream_efficiency", "phase2_score")
                assert m2[key] == pytest.approx(m1[key], rel=1e-4 if kl_based else 1e-6), (kind, key)
