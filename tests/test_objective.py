"""--objective kl / mse+kl: the compressor trained on what phase 2 reads, the LM head's next-token distribution."""

import dataclasses

import pytest
import torch

from trm_ray import downstream
from trm_ray.compressor import DimensionCompressor, read_checkpoint
from trm_ray.config import UserError, make_config
from trm_ray.downstream import load_lm_head, mean_fisher, next_token_damage, next_token_kl, validation_rows
from trm_ray.shards import load_splits
from trm_ray.spectrum import eigenvectors, training_mean
from trm_ray.sweep import limits
from trm_ray.train import evaluate, hidden_batches, initial_model, objective_loss

from test_train import fit


@pytest.fixture(scope="module")
def head_and_rows(shards):
    lm_head = load_lm_head(shards.model_name, torch.device("cpu"))
    hidden, targets = validation_rows(shards.shards_path, shards.val_fraction, shards.seed, 600)
    return lm_head, hidden, targets


def test_the_training_kl_equals_the_downstream_modules_kl_on_the_same_rows(shards, head_and_rows):
    lm_head, hidden, targets = head_and_rows
    torch.manual_seed(0)
    comp = DimensionCompressor(64, 8)
    kl_cfg = dataclasses.replace(shards, objective="kl")
    training = objective_loss(kl_cfg, comp, lm_head)(hidden).item()
    measured = next_token_damage(lm_head, hidden, targets, comp)["kl"]
    assert training == pytest.approx(measured, rel=1e-5)
    assert training > 0.01  # a random 8-of-64 compressor hurts the next token
    mixed = objective_loss(dataclasses.replace(shards, objective="mse+kl", kl_weight=0.5), comp, lm_head)(hidden).item()
    mse = float(torch.nn.functional.mse_loss(comp(hidden), hidden))
    assert mixed == pytest.approx(mse + 0.5 * measured, rel=1e-5)


def test_the_chunked_kl_and_its_gradient_equal_the_kl_of_all_rows_at_once(head_and_rows, monkeypatch):
    lm_head, hidden, _ = head_and_rows
    x = hidden[:300]
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    u, x_hat64 = lm_head.weight.double(), x_hat.detach().double().requires_grad_(True)  # the exact values
    logp = torch.log_softmax(x.double() @ u.T, -1)
    whole = (logp.exp() * (logp - torch.log_softmax(x_hat64 @ u.T, -1))).sum()
    (expected_grad,) = torch.autograd.grad(whole, x_hat64)
    monkeypatch.setattr(downstream, "KL_CHUNK_ELEMENTS", 70 * lm_head.out_features)  # 5 chunks, the last one short
    chunked = next_token_kl(lm_head, x, x_hat)
    chunked.backward()
    torch.testing.assert_close(chunked, whole.detach().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x_hat.grad, expected_grad.float(), rtol=1e-4, atol=1e-7)


def test_a_kl_objective_on_another_layer_than_the_last_is_a_one_line_error():
    with pytest.raises(UserError, match="needs --layer -1, not -2") as err:
        make_config({"objective": "kl", "layer": -2})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="objective must be mse, kl or mse\\+kl"):
        make_config({"objective": "ce"})


def test_a_kl_objective_from_the_pca_start_starts_at_the_reference_validation_kl(shards, head_and_rows):
    lm_head, _, _ = head_and_rows
    cfg = dataclasses.replace(shards, objective="kl", init="pca", d_compressed=16)
    reference = limits(cfg)["pca_downstream_kl"]  # what a sweep hands its trials, per D' of its grid
    model = initial_model(cfg, {"d_model": 64})
    top = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed)[:, :16].float()
    torch.testing.assert_close(model.weight, top.T)
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed)
    start = evaluate(model, hidden_batches(val, 512, torch.device("cpu")), mean, lm_head)["downstream_kl"]
    assert start == pytest.approx(reference["16"], rel=1e-4)  # downstream_efficiency starts at 1.0
    assert reference["8"] > reference["16"] > reference["32"] > 0


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


def test_a_kl_sweep_starts_from_the_fisher_basis_it_stores_beside_the_spectrum(shards, head_and_rows):
    lm_head, hidden, targets = head_and_rows
    cfg = make_config({"objective": "kl", "shards_dir": shards.shards_path, "model_name": shards.model_name,
                       "val_fraction": shards.val_fraction, "seed": shards.seed, "d_compressed": 16})
    assert cfg.init == "fisher"  # a KL objective's default start
    reference = limits(cfg)["pca_downstream_kl"]
    basis = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed, "fisher")
    torch.testing.assert_close(basis.T @ basis, torch.eye(64, dtype=basis.dtype), atol=1e-10, rtol=0)
    model = initial_model(cfg, {"d_model": 64})
    torch.testing.assert_close(model.weight, basis[:, :16].T.float())
    # Not PCA's subspace: it keeps what moves the logits, and the head reading it tells the difference.
    fisher_kl = next_token_damage(lm_head, hidden, targets, model)["kl"]
    pca = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed)[:, :16].float()
    assert fisher_kl != pytest.approx(next_token_damage(lm_head, hidden, targets, lambda h: h @ pca @ pca.T)["kl"], rel=1e-3)
    assert reference["16"] > 0


@pytest.mark.parametrize("orthonormal", [True, False], ids=["orthonormal-rows", "free-rows"])
def test_a_kl_trial_with_the_kl_defaults_lowers_validation_kl_below_pcas(shards, tmp_path, orthonormal):
    defaults = make_config({"objective": "kl"})  # the Fisher start, the KL learning rate
    result = fit(shards, tmp_path, num_workers=1, batch_size=1, objective="kl", num_epochs=3, init=defaults.init,
                 learning_rate=defaults.learning_rate, orthonormal=orthonormal)
    m = result.metrics
    assert result.error is None
    assert m["best_downstream_kl"] < 0.8 * m["pca_downstream_kl"]
    assert m["downstream_efficiency"] == pytest.approx(m["pca_downstream_kl"] / m["downstream_kl"])
    best = read_checkpoint(f"{result.checkpoint.path}/compressor.pt")
    assert best["best_loss"] == pytest.approx(m["best_downstream_kl"])  # the trial's best is chosen on KL
    assert best["best_metrics"]["epoch"] > 0  # and is a trained epoch's: the start (epoch 0) was beaten
    if orthonormal:  # only the subspace is learnt: WᵀW stays an orthogonal projection for phase 2
        assert m["orthonormality_error"] < 1e-5
    else:  # free to, KL training leaves the projections
        assert m["orthonormality_error"] > 0.01


def test_the_kl_through_a_bf16_head_has_no_rounding_floor_and_matches_float64_on_the_same_weights():
    torch.manual_seed(0)
    d, vocab, n = 512, 32_768, 32
    lm_head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    lm_head.weight.normal_(0, d ** -0.5)
    lm_head = lm_head.bfloat16()
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
