"""Stage 1b's per-region objective and scores, on rows in memory (no Ray)."""

import pytest
import torch

from trm_ray import phase2
from trm_ray.config import UserError, make_config
from trm_ray.compressor import DimensionCompressor
from trm_ray.kl import LMHead

CODES = {"context": 1, "close": 3}


def kl(head: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p(x) || p(x_hat)) of a plain linear head, in float64."""
    logp, logq = torch.log_softmax(x.double() @ head.double().T, -1), torch.log_softmax(x_hat.double() @ head.double().T, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.fixture
def rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    region = torch.full((64,), CODES["context"])
    region[[5, 40]] = CODES["close"]
    region[[7]] = 0  # a row of another region: neither term reads it
    head = torch.randn(50, 16, generator=gen)
    models = [DimensionCompressor(16, d) for d in (4, 8)]
    return x, region, head, models


def test_the_score_is_the_close_kl_against_pca_while_the_context_keeps_its_floor():
    assert phase2.phase2_score(0.05, 0.1, 0.99) == pytest.approx(0.5)
    assert phase2.phase2_score(0.05, 0.1, phase2.CONTEXT_FLOOR) == pytest.approx(0.5)
    # 1% of the limit's mse below the floor costs FLOOR_PENALTY * 0.01 on top.
    below = 1 / (1 / phase2.CONTEXT_FLOOR + 0.01)
    assert phase2.phase2_score(0.05, 0.1, below) == pytest.approx(0.5 + phase2.FLOOR_PENALTY * 0.01)


def test_the_phase2_loss_weighs_each_region_by_its_own_mean_and_reference(rows):
    x, region, head, models = rows
    refs = {4: (2.0, 0.5), 8: (1.0, 0.25)}
    loss = phase2.region_loss(LMHead(head, None), 3.0, refs, CODES)(x, models, region)
    context, close = x[region == CODES["context"]], x[region == CODES["close"]]
    for value, m in zip(loss.detach(), models):
        d = m.weight.shape[0]
        with torch.no_grad():
            expected = (((m(context) - context) ** 2).mean() / refs[d][0]
                        + 3.0 * kl(head, close, m(close)).mean() / refs[d][1])
        assert float(value) == pytest.approx(float(expected), rel=1e-4)
    loss.sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in models)


def test_a_batch_without_a_closing_state_trains_the_context_alone(rows):
    x, region, head, models = rows
    region = torch.where(region == CODES["close"], CODES["context"], region)
    loss = phase2.region_loss(LMHead(head, None), 3.0, {4: (2.0, 0.5), 8: (1.0, 0.25)}, CODES)(x, models, region)
    context = x[region == CODES["context"]]
    with torch.no_grad():
        assert float(loss[0]) == pytest.approx(float(((models[0](context) - context) ** 2).mean() / 2.0), rel=1e-5)


def test_validation_scores_each_region_on_one_read_of_the_batches(rows):
    x, region, head, models = rows
    mean = x.double().mean(0)
    batches = [(x[:30], region[:30]), (x[30:], region[30:])]
    found = phase2.evaluate_regions(models, iter(batches), mean, LMHead(head, None), CODES)
    context, close = x[region == CODES["context"]], x[region == CODES["close"]]
    for m, metrics in zip(models, found):
        with torch.no_grad():
            assert metrics["mse"] == pytest.approx(float(((m(x) - x) ** 2).mean()), rel=1e-5)
            assert metrics["context_mse"] == pytest.approx(float(((m(context) - context) ** 2).mean()), rel=1e-5)
            assert metrics["close_downstream_kl"] == pytest.approx(float(kl(head, close, m(close)).mean()), rel=1e-4)
            agree = (close @ head.T).argmax(-1) == (m(close) @ head.T).argmax(-1)
        assert metrics["close_top1_agreement"] == pytest.approx(float(agree.double().mean()))
        assert metrics["close_tokens"] == 2
        phase2.add_scores(metrics, context_pca_mse=0.5, close_pca_kl=0.1)
        assert metrics["context_pca_efficiency"] == pytest.approx(0.5 / metrics["context_mse"])
        assert metrics["phase2_score"] == pytest.approx(
            phase2.phase2_score(metrics["close_downstream_kl"], 0.1, metrics["context_pca_efficiency"]))


def test_stage_1b_on_phase2_shards_at_the_last_layer_defaults_to_the_phase2_objective():
    assert make_config({"stage": "1b"}).objective == "phase2"
    assert make_config({"stage": "1b"}).score_metric == make_config({"stage": "1b"}).rank_metric == "phase2_score"
    assert make_config({"stage": "1b", "keep_tokens": "thinking"}).objective == "mse"
    assert make_config({"stage": "1b", "layer": -2}).objective == "mse"  # no LM head reads another layer
    assert make_config({"stage": "1a"}).objective == "mse"


def test_the_phase2_objective_on_shards_without_its_regions_is_a_one_line_error():
    with pytest.raises(UserError, match="only stage 1b shards of --keep_tokens phase2 hold") as err:
        make_config({"stage": "1b", "keep_tokens": "thinking", "objective": "phase2"})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="asha_metric phase2_score is measured only with --objective phase2"):
        make_config({"asha_metric": "phase2_score"})


def test_refining_the_start_lowers_the_phase2_loss_on_the_rows_themselves_and_keeps_rows_orthonormal():
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(400, 16, generator=gen) * torch.linspace(3, 0.3, 16)  # a spectrum with a top
    close = torch.randn(60, 16, generator=gen) + 2 * torch.eye(16)[10]  # what the head reads sits low in it
    head = torch.randn(50, 16, generator=gen) * 2
    sigma = context.double().T @ context.double() / len(context)
    evals, evecs = torch.linalg.eigh(sigma)
    d, weight = 4, 0.3
    start = evecs.flip(1)[:, :d].T.float()  # the context's own PCA
    limit = float(evals.flip(0)[d:].sum())

    def loss(w):
        """The phase2 loss computed on the rows, not from the second moment the refinement reads."""
        mse = ((context - context @ w.T @ w) ** 2).sum(-1).mean()
        return float(mse / limit + weight * kl(head, close, close @ w.T @ w).mean() / 0.1)

    with torch.no_grad():  # as the sweep's pass over the shards calls it
        refined = phase2.refine_start(start, sigma, limit, close, LMHead(head, None), 0.1, weight, steps=100, lr=0.01, batch=32)
    assert refined.shape == (d, 16)
    assert loss(refined) < 0.9 * loss(start)
    torch.testing.assert_close(refined @ refined.T, torch.eye(d), atol=1e-5, rtol=0)
