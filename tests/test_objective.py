"""--objective kl / mse+kl: the compressor trained on what phase 2 reads, the LM head's next-token distribution."""

import dataclasses
import io
import os
import shutil

import pytest
import torch

from trm_ray import kl as kl_module
from trm_ray import downstream
from trm_ray.compressor import DimensionCompressor, read_checkpoint
from trm_ray.config import UserError, make_config
from trm_ray.kl import mean_fisher, next_token_damage, next_token_kl
from trm_ray.pca import fisher_basis, quadratic_kl
from trm_ray.references import start_basis, store_fisher_start
from trm_ray.hidden import validation_rows
from trm_ray.kl import LMHead
from trm_ray.model import load_lm_head
from trm_ray.files import read_json, write_bytes, write_json
from trm_ray.shards import MANIFEST
from trm_ray.train import load_splits
from trm_ray.names import spectrum_files
from trm_ray.references import eigenvectors, manifest_key, stored, training_mean
from trm_ray.sweep import limits
from trm_ray.loop import evaluate
from trm_ray.train import hidden_batches, initial_model, objective_loss

from helpers import fit, width_metrics


@pytest.fixture(scope="module")
def head_and_rows(shards):
    lm_head = load_lm_head(shards.model_name, torch.device("cpu"))
    hidden, targets = validation_rows(shards.shards_path, shards.val_fraction, shards.seed, 600)
    return lm_head, hidden, targets


@pytest.mark.integration
def test_the_training_kl_equals_the_downstream_modules_kl_on_the_same_rows(shards, head_and_rows):
    lm_head, hidden, targets = head_and_rows
    torch.manual_seed(0)
    comp = DimensionCompressor(64, 8)
    kl_cfg = dataclasses.replace(shards, objective="kl")
    training = objective_loss(kl_cfg, lm_head)(hidden, [comp]).item()
    measured = next_token_damage(lm_head, hidden, targets, comp)["kl"]
    assert training == pytest.approx(measured, rel=1e-5)
    assert training > 0.01  # a random 8-of-64 compressor hurts the next token
    mixed = objective_loss(dataclasses.replace(shards, objective="mse+kl", kl_weight=0.5), lm_head)(hidden, [comp]).item()
    mse = float(torch.nn.functional.mse_loss(comp(hidden), hidden))
    assert mixed == pytest.approx(mse + 0.5 * measured, rel=1e-5)


@pytest.mark.integration
def test_the_chunked_kl_and_its_gradient_equal_the_kl_of_all_rows_at_once(head_and_rows, monkeypatch):
    lm_head, hidden, _ = head_and_rows
    x = hidden[:300]
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    u, x_hat64 = lm_head.weight.double(), x_hat.detach().double().requires_grad_(True)  # the exact values
    logp = torch.log_softmax(x.double() @ u.T, -1)
    whole = (logp.exp() * (logp - torch.log_softmax(x_hat64 @ u.T, -1))).sum()
    (expected_grad,) = torch.autograd.grad(whole, x_hat64)
    monkeypatch.setattr(kl_module, "KL_CHUNK_ELEMENTS", 70 * lm_head.out_features)  # 5 chunks, the last one short
    chunked = next_token_kl(lm_head, x, x_hat)
    chunked.backward()
    torch.testing.assert_close(chunked, whole.detach().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x_hat.grad, expected_grad.float(), rtol=1e-4, atol=1e-7)


def test_a_kl_objective_on_another_layer_than_the_last_is_a_one_line_error():
    with pytest.raises(UserError, match="needs --layer -1, not -2") as err:
        make_config({"objective": "kl", "layer": -2})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="objective must be mse, kl, mse\\+kl or phase2"):
        make_config({"objective": "ce"})


@pytest.mark.integration
def test_a_kl_objective_from_the_pca_start_starts_at_the_reference_validation_kl(shards, head_and_rows):
    lm_head, _, _ = head_and_rows
    cfg = dataclasses.replace(shards, objective="kl", init="pca", d_compressed=16)
    reference = limits(cfg)["pca_downstream_kl"]  # what a sweep hands its trials, per D' of its grid
    model = initial_model(cfg, 64)
    top = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed)[:, :16].float()
    torch.testing.assert_close(model.weight, top.T)
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed)
    start = evaluate([model], hidden_batches(val, 512, torch.device("cpu")), mean, lm_head)[0]["downstream_kl"]
    assert start == pytest.approx(reference["16"], rel=1e-4)  # downstream_efficiency starts at 1.0
    assert reference["8"] > reference["16"] > reference["32"] > 0


@pytest.mark.integration
def test_the_mean_fisher_information_gives_the_kl_of_a_small_step_to_second_order(head_and_rows):
    lm_head, hidden, _ = head_and_rows
    x = hidden[:400]
    fisher, n = mean_fisher(lm_head, [x[:150], x[150:]])
    assert n == 400
    u, x = lm_head.weight.double(), x.double()  # float64: the KL of a small step is below float32's resolution
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
        v = 1e-2 * v / v.norm()
        logp, logq = torch.log_softmax(x @ u.T, -1), torch.log_softmax((x + v) @ u.T, -1)
        kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
        assert kl == pytest.approx(0.5 * float(v @ fisher @ v), rel=1e-3)


def quadratic_model(fisher, sigma, top):
    """½ tr(F (I - P) Σ (I - P)) for P the projection onto the columns of `top`, written out."""
    rest = torch.eye(fisher.shape[0], dtype=torch.float64) - top.double() @ top.double().T
    return 0.5 * float(torch.trace(fisher @ rest @ sigma @ rest))


@pytest.mark.integration
def test_a_kl_sweep_starts_from_the_fisher_basis_and_beats_pca_on_the_quadratic_kl_of_the_training_rows(shards, head_and_rows):
    lm_head, hidden, targets = head_and_rows
    cfg = make_config({"objective": "kl", "shards_dir": shards.shards_path, "model_name": shards.model_name,
                       "val_fraction": shards.val_fraction, "seed": shards.seed, "d_compressed": 16})
    assert cfg.init == "fisher"  # a KL objective's default start
    reference = limits(cfg)["pca_downstream_kl"]
    basis = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed, "fisher")
    torch.testing.assert_close(basis.T @ basis, torch.eye(64, dtype=basis.dtype), atol=1e-10, rtol=0)
    # The quadratic model on the training rows, rebuilt here: F from the head, Σ = E[xxᵀ].
    train, _ = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    x = torch.cat(list(hidden_batches(train, 4096, torch.device("cpu")))).double()
    fisher, _ = mean_fisher(lm_head, [x.float()])
    sigma = x.T @ x / len(x)
    pca = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed)
    for d in (4, 8, 16, 32):
        model = initial_model(dataclasses.replace(cfg, d_compressed=d), 64)
        assert quadratic_model(fisher, sigma, model.weight.T) <= quadratic_model(fisher, sigma, pca[:, :d]) * (1 + 1e-3), d
    model = initial_model(cfg, 64)
    torch.testing.assert_close(model.weight, basis[:, :16].T.float())  # at D'=16 the Fisher basis is the better start
    assert quadratic_model(fisher, sigma, model.weight.T) < quadratic_model(fisher, sigma, pca[:, :16])
    fisher_kl = next_token_damage(lm_head, hidden, targets, model)["kl"]  # and the head reading it agrees
    pca16 = pca[:, :16].float()
    assert fisher_kl < next_token_damage(lm_head, hidden, targets, lambda h: h @ pca16 @ pca16.T)["kl"]
    assert reference["16"] > 0


def test_the_fisher_start_is_never_worse_than_pcas_under_the_quadratic_kl(tmp_path):
    d, gen, raw_worse = 10, torch.Generator().manual_seed(0), 0
    write_json(str(tmp_path / MANIFEST), {"hidden_size": d})
    for _ in range(40):
        a = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
        sigma = a @ a.T
        b = torch.randn(d, d, generator=gen, dtype=torch.float64)
        fisher = b @ b.T / d
        pca = torch.linalg.eigh(sigma)[1].flip(1)
        buf = io.BytesIO()
        torch.save({"eigenvectors": pca, "split": {"val_fraction": 0.1, "seed": 42}, "manifest": manifest_key(str(tmp_path))}, buf)
        write_bytes(spectrum_files(str(tmp_path), 0.1, 42)[1], buf.getvalue())
        store_fisher_start(str(tmp_path), 0.1, 42, fisher, sigma, pca, 1)
        raw = fisher_basis(fisher, sigma)
        curve = quadratic_kl(fisher, sigma, raw)
        for k in range(1, d):
            assert float(curve[k]) == pytest.approx(quadratic_model(fisher, sigma, raw[:, :k]), rel=1e-9)
            raw_worse += quadratic_model(fisher, sigma, raw[:, :k]) > quadratic_model(fisher, sigma, pca[:, :k])
            start = start_basis(str(tmp_path), 0.1, 42, "fisher", k)
            assert quadratic_model(fisher, sigma, start) <= quadratic_model(fisher, sigma, pca[:, :k]) * (1 + 1e-12)
    assert raw_worse > 0  # the orthonormalised Fisher basis alone is sometimes worse than PCA's


@pytest.mark.integration
@pytest.mark.parametrize("orthonormal", [True, False], ids=["orthonormal-rows", "free-rows"])
def test_a_kl_trial_with_the_kl_defaults_lowers_validation_kl_below_pcas(shards, tmp_path, orthonormal):
    defaults = make_config({"objective": "kl"})  # the Fisher start, the KL learning rate
    result = fit(shards, tmp_path, num_workers=1, batch_size=1, objective="kl", num_epochs=3, init=defaults.init,
                 learning_rate=defaults.learning_rate, orthonormal=orthonormal)
    m = width_metrics(result)
    assert result.error is None
    assert m["best_downstream_kl"] < 0.8 * m["pca_downstream_kl"]
    assert m["downstream_efficiency"] == pytest.approx(m["pca_downstream_kl"] / m["downstream_kl"])
    best = read_checkpoint(f"{result.checkpoint.path}/d16/compressor.pt")
    assert best["best_loss"] == pytest.approx(m["best_downstream_kl"])  # the trial's best is chosen on KL
    assert best["best_metrics"]["epoch"] > 0  # and is a trained epoch's: the start (epoch 0) was beaten
    if orthonormal:  # only the subspace is learnt: WᵀW stays an orthogonal projection for phase 2
        assert m["orthonormality_error"] < 1e-5
    else:  # free to, KL training leaves the projections
        assert m["orthonormality_error"] > 0.01


def test_the_kl_through_a_bf16_head_has_no_rounding_floor_and_matches_float64_on_the_same_weights():
    torch.manual_seed(0)
    d, vocab, n = 512, 32_768, 32
    lm_head = LMHead((torch.randn(vocab, d) * d ** -0.5).bfloat16(), None)
    x = 8 * torch.randn(n, d)  # logits of std ~8: bf16 rounds those of 16-32 to steps of 0.125
    assert float(next_token_kl(lm_head, x, x.clone())) == 0.0
    x_hat = (x + 8e-3 * torch.randn(n, d)).requires_grad_(True)
    kl = next_token_kl(lm_head, x, x_hat)
    kl.backward()
    u, x_hat64 = lm_head.weight.double(), x_hat.detach().double().requires_grad_(True)
    logp, logq = torch.log_softmax(x.double() @ u.T, -1), torch.log_softmax(x_hat64 @ u.T, -1)
    exact = (logp.exp() * (logp - logq)).sum()
    exact.backward()
    assert 5e-6 < float(exact) / n < 5e-5  # per token: below what bf16 logits resolve
    assert float(kl) == pytest.approx(float(exact), rel=0.01)
    assert float((x_hat.grad.double() - x_hat64.grad).norm() / x_hat64.grad.norm()) < 0.05


@pytest.mark.integration
def test_the_pca_kl_and_the_fisher_start_are_stored_once_per_shard_set_recomputed_for_new_shards_and_split_to_equal_sums(
        shards, tmp_path, monkeypatch):
    shards_dir = str(tmp_path / "shards")
    shutil.copytree(shards.shards_path, shards_dir, ignore=shutil.ignore_patterns("spectrum*", "fisher*", "pca_kl*"))
    cfg = dataclasses.replace(make_config({"objective": "kl", "model_name": shards.model_name}), shards_dir=shards_dir,
                              val_fraction=shards.val_fraction, seed=shards.seed, sweep=True, sweep_d_values=[8, 16])
    calls, split = [], downstream.on_every_device
    monkeypatch.setattr(downstream, "on_every_device",
                        lambda use_gpu, parts, fn, *args: calls.append((fn.__name__, args[-1])) or split(use_gpu, parts, fn, *args))
    first = limits(cfg)["pca_downstream_kl"]
    assert [name for name, _ in calls] == ["fisher_sums", "pca_kl_sums"]
    assert limits(cfg)["pca_downstream_kl"] == first and len(calls) == 2  # a second sweep, or a resumed one
    wider = limits(dataclasses.replace(cfg, sweep_d_values=[8, 16, 32]))["pca_downstream_kl"]
    assert calls[2:] == [("pca_kl_sums", [32])] and {k: wider[k] for k in first} == first
    # Split over the session Ray's CPUs (as many tasks as the cores, at most the 6 shards), the pass sums what one task does.
    args = (cfg.model_name, shards_dir, cfg.val_fraction, cfg.seed, [8, 16])
    parts = split(False, 6, downstream.pca_kl_sums, *args)
    whole, n = downstream.pca_kl_sums(*args)
    assert len(parts) == min(6, os.cpu_count()) and sum(rows for _, rows in parts) == n
    assert sum(rows > 0 for _, rows in parts) >= min(2, os.cpu_count())  # the rows are shared, not all in one task
    torch.testing.assert_close(sum(sums for sums, _ in parts), whole, rtol=1e-6, atol=0)
    # So does the Fisher information's: each task sums its own contiguous range of the first training rows.
    rows = calls[0][1]
    fisher_args = (cfg.model_name, shards_dir, cfg.val_fraction, cfg.seed, rows)
    parts = split(False, 2, downstream.fisher_sums, *fisher_args)
    whole, n = downstream.fisher_sums(*fisher_args)
    assert n == rows and [m for _, m in parts] == ([rows // 2, rows - rows // 2] if os.cpu_count() > 1 else [rows])
    torch.testing.assert_close(sum(f for f, _ in parts), whole, rtol=0, atol=1e-7 * float(whole.abs().max()))  # float32 logits
    # Shards extracted again (here: from another revision of the model, as the manifest says) reuse none of it.
    before = manifest_key(shards_dir)
    write_json(f"{shards_dir}/{MANIFEST}", {**read_json(f"{shards_dir}/{MANIFEST}"), "revision": "another"})
    assert stored(shards_dir, cfg.val_fraction, cfg.seed) is None
    limits(cfg)
    assert [name for name, _ in calls[3:]] == ["fisher_sums", "pca_kl_sums"]
    assert stored(shards_dir, cfg.val_fraction, cfg.seed)["manifest"] == manifest_key(shards_dir) != before
