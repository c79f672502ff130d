import glob
import io
import time

import numpy as np
import pytest
import torch

from trm_ray import train as train_module
from trm_ray import compressor
from trm_ray.compressor import (DimensionCompressor, metrics_from_sums, orthonormality_error,
                                orthonormalize_, read_checkpoint, reconstruction_sums, tangent_part)
from trm_ray.config import Config, UserError, make_config
from trm_ray.kl import LMHead
from trm_ray.report import shortfall_note
from trm_ray.shards import read_manifest, split_counts
from trm_ray.loop import Comm, EarlyStopping, get_lr, make_optimizer, optimizer_step
from trm_ray.train import ASHA_WAIT_S, epoch_rows, load_splits, objective_loss, resumed_cuts

from helpers import fit, wandb_records


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    assert get_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert get_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert get_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert get_lr(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert get_lr(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert get_lr(500, 100, 10, 1.0) == pytest.approx(0.0)


def test_a_resumed_optimizer_state_follows_the_model_to_where_prepare_model_put_it():
    cfg = make_config({"learning_rate": 0.01})
    model = DimensionCompressor(32, 8)
    optimizer = make_optimizer(model, cfg)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(torch.randn(16, 32)), torch.randn(16, 32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as resume.pt holds it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = DimensionCompressor(32, 8)
    resumed.load_state_dict(model.state_dict())
    # What prepare_model does to a worker's model: a move (to the GPU there; here to float64, which
    # the state must follow the same way and which a CPU can check).
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    resumed.to(device=device, dtype=torch.float64)
    restored = make_optimizer(resumed, cfg, saved)
    for param, old in zip(resumed.parameters(), model.parameters()):
        state = restored.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].device == param.device and state[key].dtype == param.dtype, key
            torch.testing.assert_close(state[key].cpu().float(), optimizer.state[old][key])
    x = torch.randn(16, 32, dtype=torch.float64, device=device)
    torch.nn.functional.mse_loss(resumed(x), x).backward()
    restored.step()  # the step that failed on a GPU when the moments stayed on the CPU


def test_compressor_is_weight_tied_orthogonal_and_has_d_times_d_prime_parameters():
    model = DimensionCompressor(64, 16)
    assert sum(p.numel() for p in model.parameters()) == 64 * 16
    torch.testing.assert_close(model.weight @ model.weight.T, torch.eye(16), atol=1e-5, rtol=0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(model(x), model.decompress(model.compress(x)))
    torch.testing.assert_close(model.decompress(model.compress(x)), x @ model.weight.T @ model.weight)


def test_orthonormality_error_is_the_frobenius_norm_of_wwt_minus_i_over_sqrt_d_prime():
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(0)).double()
    direct = float(torch.sqrt(((w @ w.T - torch.eye(12, dtype=torch.float64)) ** 2).sum()) / 12 ** 0.5)
    assert orthonormality_error(w) == pytest.approx(direct, rel=1e-12)
    assert orthonormality_error(DimensionCompressor(40, 12).weight) < 1e-6


def test_retraction_gives_orthonormal_rows_with_the_same_row_space_and_keeps_orthonormal_rows_as_they_are():
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))
    before = w.clone().double()
    orthonormalize_(w)
    assert orthonormality_error(w) < 1e-6
    proj = w.double().T @ w.double()  # the projection onto the new row space keeps the old rows
    torch.testing.assert_close(before @ proj, before, atol=1e-5, rtol=0)
    again = w.clone()
    orthonormalize_(again)
    torch.testing.assert_close(again, w, atol=1e-6, rtol=0)


def test_the_retraction_runs_in_float32_and_again_in_float64_only_past_the_tolerance(monkeypatch):
    qr, dtypes = torch.linalg.qr, []
    monkeypatch.setattr(torch.linalg, "qr", lambda a: dtypes.append(a.dtype) or qr(a))
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    orthonormalize_(w)
    assert dtypes == [torch.float32] and orthonormality_error(w) < 1e-6
    monkeypatch.setattr(compressor, "ORTHONORMALITY_TOLERANCE", 0.0)  # no float32 QR is that exact
    orthonormalize_(w)
    assert dtypes == [torch.float32, torch.float32, torch.float64] and orthonormality_error(w) < 1e-6


def test_riemannian_adam_feeds_adam_the_tangent_gradient_and_keeps_rows_orthonormal_every_step():
    torch.manual_seed(0)
    lm_head = LMHead(torch.randn(500, 64) * 64 ** -0.5, None)
    cfg = make_config({"objective": "kl", "learning_rate": 1e-2, "grad_clip": 1e9})
    model = DimensionCompressor(64, 16)
    optimizer = make_optimizer(model, cfg)
    loss_fn = objective_loss(cfg, lm_head)
    x = 4 * torch.randn(256, 64)
    (grad,) = torch.autograd.grad(loss_fn(x, [model])[0], model.weight)
    tangent = tangent_part(model.weight, grad)
    assert float((grad - tangent).norm()) > 0.1 * float(grad.norm())  # a KL gradient also rescales the rows
    optimizer_step([model], optimizer, loss_fn, x, cfg)
    beta2 = optimizer.param_groups[0]["betas"][1]
    torch.testing.assert_close(optimizer.state[model.weight]["exp_avg_sq"], (1 - beta2) * tangent ** 2)
    for _ in range(30):
        optimizer_step([model], optimizer, loss_fn, 4 * torch.randn(256, 64), cfg)
        assert orthonormality_error(model.weight) <= 1e-6
    momentum = optimizer.state[model.weight]["exp_avg"]
    torch.testing.assert_close(tangent_part(model.weight, momentum), momentum, atol=1e-6 * float(momentum.abs().max()), rtol=0)


@pytest.mark.parametrize("d", [0, -3, 64, 65])
def test_d_prime_outside_1_to_d_minus_1_is_refused(d):
    with pytest.raises(UserError, match="between 1 and D-1 = 63"):
        DimensionCompressor(64, d)


def test_metrics_summed_over_batches_equal_the_formulas_on_the_whole_set():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen) * 3 + 1
    x_hat = x + 0.3 * torch.randn(300, 16, generator=gen)
    sums = sum(reconstruction_sums(x[i:i + 70], x_hat[i:i + 70], torch.zeros(16)) for i in range(0, 300, 70))
    m = metrics_from_sums(sums)
    xd, hd = x.double(), x_hat.double()
    assert m["mse"] == pytest.approx(float(((hd - xd) ** 2).mean()), rel=1e-9)
    assert m["cosine_similarity"] == pytest.approx(float(torch.nn.functional.cosine_similarity(hd, xd).mean()), rel=1e-9)
    assert m["relative_error"] == pytest.approx(float((hd - xd).norm() / xd.norm()), rel=1e-9)
    assert m["variance_ratio"] == pytest.approx(float(hd.var(unbiased=False) / xd.var(unbiased=False)), rel=1e-9)


def test_centred_metrics_equal_numpy_about_the_training_mean_and_a_common_offset_cannot_flatter_them():
    # A residual stream's massive, nearly constant direction: a large offset on one axis, shared by every row.
    rng = np.random.default_rng(0)
    offset = np.zeros(16)
    offset[3] = 40.0
    train = rng.normal(size=(500, 16)) + offset
    x = rng.normal(size=(300, 16)) + offset
    x_hat = x + 0.5 * rng.normal(size=(300, 16))
    mu = train.mean(0)
    sums = sum(reconstruction_sums(torch.tensor(x[i:i + 70]), torch.tensor(x_hat[i:i + 70]), torch.tensor(mu))
               for i in range(0, 300, 70))
    m = metrics_from_sums(sums)
    xc, hc = x - mu, x_hat - mu
    cos = (hc * xc).sum(1) / np.linalg.norm(hc, axis=1) / np.linalg.norm(xc, axis=1)
    assert m["centred_explained_variance"] == pytest.approx(1 - ((x_hat - x) ** 2).sum() / (xc ** 2).sum(), rel=1e-9)
    assert m["centred_cosine_similarity"] == pytest.approx(cos.mean(), rel=1e-9)
    # Uncentred, the offset makes this poor reconstruction look nearly perfect; centred, it does not.
    assert m["cosine_similarity"] > 0.998 and m["explained_variance"] > 0.99
    assert m["centred_cosine_similarity"] < 0.9 and m["centred_explained_variance"] < 0.8


def doc_ids(ds) -> set[int]:
    return {int(d) for b in ds.iter_batches(batch_format="pyarrow") for d in b["doc_id"].to_numpy()}


@pytest.mark.integration
def test_validation_documents_are_never_seen_in_training(shards):
    train, val = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    train_docs, val_docs = doc_ids(train), doc_ids(val)
    assert train_docs.isdisjoint(val_docs)
    assert train_docs | val_docs == set(range(120))
    counts = split_counts(read_manifest(shards.shards_path), shards.val_fraction, shards.seed)
    assert (len(train_docs), len(val_docs)) == (counts["train_docs"], counts["val_docs"])
    assert 5 <= len(val_docs) <= 25
    assert train.count() == counts["train_tokens"] and val.count() == counts["val_tokens"]


@pytest.mark.integration
def test_each_epoch_reads_the_same_rows_in_its_own_seeded_block_order(shards):
    train, _ = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    cached = train.materialize()
    for source in (cached, train):  # held in the object store, and streamed from the files
        orders = [[int(d) for b in epoch_rows(source, shards, e).iter_batches(batch_size=None, batch_format="numpy")
                   for d in b["doc_id"]] for e in (0, 1, 2, 3, 0)]
        assert orders[0] == orders[4]  # reproducible: a resumed epoch reads what the uninterrupted one read
        assert orders[0] != orders[1]  # another epoch, another order
        assert sorted(orders[0]) == sorted(orders[1]) == sorted(int(d) for d in cached.to_pandas()["doc_id"])
        assert len({o[-1] for o in orders}) > 1  # the epochs end on other documents


@pytest.mark.integration
def test_ranks_cutting_a_held_epoch_themselves_each_take_equal_disjoint_rows_and_together_all_but_a_remainder(shards):
    train, _ = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    held = train.materialize()
    epoch = epoch_rows(held, shards, 1)
    def rows(dataset) -> list[tuple[int, bytes]]:
        """Each row as (document, its hidden state's bytes): the rows of a document are told apart by their states."""
        return [(int(d), h.tobytes()) for b in dataset.iter_batches(batch_size=None, batch_format="numpy")
                for d, h in zip(b["doc_id"], b["hidden"])]

    shares = [rows(epoch_rows(held, shards, 1, rank, 2)) for rank in range(2)]  # each rank cuts alone, as the workers do
    whole = rows(epoch)
    assert len(shares[0]) == len(shares[1]) == len(whole) // 2
    assert shares[0] + shares[1] == whole[:2 * (len(whole) // 2)]  # disjoint, in the epoch's order; at most a row left


def test_a_corpus_too_small_for_the_validation_split_is_refused():
    with pytest.raises(UserError, match="too few for a validation split"):
        split_counts({"num_docs": 2, "doc_tokens": [5, 7]}, 0.1, 42)


@pytest.mark.integration
def test_ddp_with_two_workers_keeps_the_ranks_equal_and_matches_one_worker_at_the_same_global_batch(shards, tmp_path,
                                                                                                     monkeypatch):
    out = str(tmp_path)

    def saving_each_ranks_weights(config, train, val):
        """The training loop, then this rank's weights after its last step saved (rank 0's alone reach the checkpoint)."""
        import ray.train

        from trm_ray import loop
        from trm_ray.train import train_loop_per_worker

        step, stepped = loop.optimizer_step, []

        def recorded(models, *args):
            stepped[:] = models
            return step(models, *args)

        loop.optimizer_step = recorded
        train_loop_per_worker(config, train, val)
        torch.save([m.weight.detach().cpu() for m in stepped], f"{out}/rank{ray.train.get_context().get_world_rank()}.pt")

    one = fit(shards, tmp_path, num_workers=1, batch_size=8, num_epochs=1)
    monkeypatch.setattr(train_module, "train_loop_per_worker", saving_each_ranks_weights)  # what make_trainer runs
    # Per worker: the same rows per optimizer step. Streamed from the files (the ranks' iterators from one
    # streaming_split), where the kill test's sweep holds its rows in the object store (each rank cuts them).
    two = fit(shards, tmp_path, num_workers=2, batch_size=4, num_epochs=1, cache_datasets="never")
    assert one.error is None and two.error is None
    # Each rank steps on its own rows: only the averaged gradient keeps their weights one model.
    rank0, rank1 = (torch.load(f"{out}/rank{r}.pt") for r in (0, 1))
    for w0, w1 in zip(rank0, rank1):
        torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6)
    assert one.metrics["tokens_seen"] == pytest.approx(two.metrics["tokens_seen"], abs=4)  # equal split drops <= 1 row an epoch
    for key in ("mse", "cosine_similarity", "relative_error", "variance_ratio"):
        assert one.metrics[f"d16/{key}"] == pytest.approx(two.metrics[f"d16/{key}"], rel=0.03), key
    assert one.metrics["d16/cosine_similarity"] > 0.95


def ddp_steps(rank: int, world: int, port: int, batches: torch.Tensor, out: str) -> None:
    """Train two compressors with trm_ray's step (which averages their gradients over the ranks), each
    rank on its share of every batch; rank 0 saves both Ws after every step. One rank (world 1) needs no
    process group: the step averages nothing then."""
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = make_config({"init": "orthogonal", "learning_rate": 0.02})
    torch.manual_seed(0)
    models = [DimensionCompressor(batches.shape[-1], d) for d in (4, 8)]
    optimizer = make_optimizer(torch.nn.ModuleList(models), cfg)
    loss = objective_loss(cfg, None)
    weights = []
    for batch in batches:
        optimizer_step(models, optimizer, loss, batch.chunk(world)[rank], cfg, Comm(rank, world))
        weights.append(torch.cat([m.weight.detach().clone() for m in models]))
    if rank == 0:
        torch.save(torch.stack(weights), out)
    if world > 1:
        dist.destroy_process_group()


def test_ddp_steps_equal_one_process_on_the_whole_batch_at_every_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    batches = torch.randn(12, 64, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(0.5, -0.5, 32)
    runs = {}
    with torch.random.fork_rng():  # one process on the whole batch: this one (its seed kept from the other tests)
        ddp_steps(0, 1, 0, batches, str(tmp_path / "w1.pt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_steps, args=(2, port, batches, str(tmp_path / "w2.pt")), nprocs=2)
    for world in (1, 2):
        runs[world] = torch.load(tmp_path / f"w{world}.pt")
    assert float((runs[1][-1] - runs[1][0]).norm()) > 0.1  # an orthogonal start: the steps move W
    for step, (one, two) in enumerate(zip(runs[1], runs[2])):
        torch.testing.assert_close(two, one, atol=1e-5, rtol=0, msg=f"step {step}")


def test_a_compressor_short_of_the_limit_is_told_how_far_and_why():
    cfg = Config(init="orthogonal", learning_rate=1e-3)
    row = {"d_compressed": 128, "pca_efficiency": 0.8, "epochs_trained": 10, "learning_rate": 1e-3,
           "stop_reason": "completed all epochs"}
    assert shortfall_note(row, cfg) == ("d128: validation mse 25.0% above the PCA limit (pca_efficiency 0.8000) after 10 epochs "
                                        "from the orthogonal init at peak lr 0.001: a random start's subspace turns towards the "
                                        "top-D' one slowly; --init pca starts at the limit")
    assert shortfall_note({**row, "pca_efficiency": 0.996}, cfg) is None
    # A KL objective trades mse for next-token KL on purpose: no note for the mse it gives up.
    assert shortfall_note(row, Config(init="orthogonal", objective="kl")) is None


def test_early_stopping_counts_epochs_without_a_min_delta_improvement():
    stopper = EarlyStopping(patience=3, min_delta=1e-3)
    losses = [1.0, 0.5, 0.4999, 0.4998, 0.3, 0.2999, 0.29995, 0.2999]
    stops = [stopper.update(x) for x in losses]
    assert stops == [False, False, False, False, False, False, False, True]  # epochs 6-8 improve < 0.1%


@pytest.mark.integration
def test_a_trial_restarted_after_every_width_stopped_reports_them_all_again_and_logs_their_artifacts(shards, tmp_path):
    # learning_rate 0: no epoch beats the start, so early stopping stops both widths after epoch 1 of 3.
    settings = dict(sweep=True, sweep_d_values=[8, 16], learning_rate=0.0, num_epochs=3, early_stopping_patience=1,
                    output_dir=str(tmp_path / "out"), shards_dir=shards.shards_path)
    first = fit(shards, tmp_path, num_workers=1, batch_size=8, **settings)
    assert first.metrics["epoch"] == 1 and first.metrics["d_values_training"] == 2
    # The same trial again on its storage: what a worker replaced in the trial's tail, --resume or a retried trial runs.
    again = fit(shards, tmp_path, num_workers=1, batch_size=8, use_wandb=True, **settings)
    assert again.error is None
    assert again.metrics["resumed_after_epoch"] == 1 and again.metrics["d_values_training"] == 0
    assert again.metrics["tokens_seen"] == first.metrics["tokens_seen"]
    for d in (8, 16):
        assert "early stopping" in again.metrics[f"d{d}/stop_reason"]
        assert again.metrics[f"d{d}/mse"] == first.metrics[f"d{d}/mse"]
        best = read_checkpoint(f"{again.checkpoint.path}/d{d}/compressor.pt")  # what export_results reads
        assert best["best_metrics"]["epoch"] <= 1 and best["best_metrics"]["mse"] == first.metrics[f"d{d}/best_mse"]
        runs = glob.glob(str(tmp_path / "out" / "wandb" / f"offline-run-*-stage1a-d{d}" / "*.wandb"))
        assert len(runs) == 1  # the W&B tail ran: the width's best checkpoint is its run's artifact
        artifacts = [r.artifact for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "artifact"]
        assert [(a.name, a.type) for a in artifacts] == [(f"compressor-stage1a-d{d}", "model")]


@pytest.mark.integration
def test_a_trial_resumed_by_a_later_sweep_takes_the_restored_cuts_without_waiting_for_a_decision(ray_cluster):
    from trm_ray.scheduler import WidthCuts

    # A resumed sweep's WidthCuts: the cuts read back from the rungs file, no report decided since it started.
    cuts = ray_cluster.remote(WidthCuts).options(num_cpus=0).remote({"lr0.01": [8]})
    ray_cluster.get(cuts.__ray_ready__.remote())
    began = time.monotonic()
    try:
        assert resumed_cuts(cuts, "lr0.01", 5000, written_by="ffffffff") == [8]  # a checkpoint of an earlier job
        assert resumed_cuts(cuts, "lr0.02", 5000, written_by=None) == []  # one written before checkpoints said
    finally:
        ray_cluster.kill(cuts)
    assert time.monotonic() - began < ASHA_WAIT_S / 4  # no wait for a decision that the earlier driver took or lost


def test_each_rank_takes_its_own_contiguous_share_of_every_validation_batch_and_together_all_rows():
    from trm_ray.extract import shard_table
    from trm_ray.train import hidden_batches

    rows = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(14, 4)
    table = shard_table(rows, np.zeros(14, np.int64), np.arange(14), np.zeros(14, np.int32), "bfloat16",
                        regions=np.arange(14) % 3)

    class Batches:  # what Ray Data's iterator hands the worker: pyarrow tables of `batch_size` rows
        def iter_batches(self, batch_size, batch_format, prefetch_batches):
            assert batch_format == "pyarrow" and prefetch_batches == 1  # on a CPU: Ray Data's default
            return (table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size))

    shares = [list(hidden_batches(Batches(), 7, torch.device("cpu"), regions=True, comm=Comm(rank, 3))) for rank in range(3)]
    assert [[len(x) for x, _ in share] for share in shares] == [[2, 2], [2, 2], [3, 3]]
    for batch in range(2):  # in rank order, the shares are the batch itself, each row once
        x = torch.cat([share[batch][0] for share in shares])
        region = torch.cat([share[batch][1] for share in shares])
        torch.testing.assert_close(x, rows[7 * batch:7 * batch + 7].bfloat16().float())
        assert region.tolist() == [i % 3 for i in range(7 * batch, 7 * batch + 7)]
