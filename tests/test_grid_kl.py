"""One LM-head pass for every D' of a KL grid: `grid_kl` equals each width's own `next_token_kl`, values and gradients."""

import functools

import pytest
import torch

from trm_ray import kl as kl_module
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import make_config
from trm_ray.kl import factored, grid_kl, next_token_kl
from trm_ray.kl import LMHead
from trm_ray.loop import compile_or_eager
from trm_ray.train import objective_loss

D, VOCAB, WIDTHS = 48, 500, (4, 8, 24)


def head(bias: bool, dtype: torch.dtype = torch.float32, scale: float = 1.0, softcap: float | None = None) -> LMHead:
    """A random frozen head whose largest logits are ~18, as a real head's are (`scale`: its raw logits' multiplier)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, D, generator=gen) * 5 * D ** -0.5 / scale
    return LMHead(weight.to(dtype), torch.randn(VOCAB, generator=gen).to(dtype) if bias else None, scale, softcap)


def rows_and_weights(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows with a decaying spectrum, and for each width its top coordinates rotated and perturbed: KLs a token from ~1e-3 (D'=24) to ~0.5 (D'=4)."""
    gen = torch.Generator().manual_seed(1)
    rotation = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]
    x = (torch.randn(n, D, generator=gen) * torch.logspace(0.3, -4, D)) @ rotation.T
    weights = [(rotation[:, :d].T + 0.002 * torch.randn(d, D, generator=gen)).requires_grad_(True) for d in WIDTHS]
    return x, weights


def per_width(lm_head: LMHead, x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Today's step, one width at a time: the KLs and their gradients in each W."""
    kls = torch.stack([next_token_kl(lm_head, x, (x @ w.T) @ w) for w in weights])
    return kls.detach(), list(torch.autograd.grad(kls.sum(), weights))


@pytest.mark.parametrize("bias, scale", [(False, 1.0), (True, 1.0), (True, 0.25)], ids=["no-bias", "bias", "bias-scaled"])
@pytest.mark.parametrize("rows, paths", [(37, (True, True, False)), (400, (True, True, True)), (4, (False, False, False))],
                         ids=["mixed", "all-factored", "all-residual"])
def test_grid_kl_and_its_gradients_equal_each_widths_own_next_token_kl(monkeypatch, bias, scale, rows, paths):
    lm_head = head(bias, scale=scale)  # scaled: Cohere's and Granite's heads multiply or divide their logits
    assert tuple(factored(lm_head, d, rows) for d in WIDTHS) == paths
    monkeypatch.setattr(kl_module, "KL_CHUNK_ELEMENTS", 5 * VOCAB)  # chunks of 5 rows, the last one short
    x, weights = rows_and_weights(rows)
    expected, expected_grads = per_width(lm_head, x, weights)
    kls = grid_kl(lm_head, x, weights)
    grads = torch.autograd.grad((kls * torch.tensor([1.0, 2.0, 3.0])).sum(), weights)
    assert 1e-4 < float(expected.min()) / rows < 2e-3 and float(expected.max()) / rows > 0.2  # small KLs and large
    # Float32's rounding of logits of ~18 is ~1e-6, and the factored path's r = z Aᵀ - t carries it: against
    # the widest width's r of ~0.03 that is ~3e-5 of its gradient's largest element (float64 puts the
    # factored path at 1.0e-5 of it, the residual at 2.8e-6); each KL agrees to 1e-6 relative.
    torch.testing.assert_close(kls, expected, rtol=1e-5, atol=0)
    for scale, grad, want in zip((1, 2, 3), grads, expected_grads):
        torch.testing.assert_close(grad, scale * want, rtol=1e-4, atol=3e-5 * scale * float(want.abs().max()))


def assert_residual_path_matches_each_widths_kl(lm_head: LMHead, monkeypatch) -> None:
    """On 37 rows in chunks of 5: no width factored, and grid_kl's KLs and gradients those of each width's own
    step (the same residual matmuls and the teacher's log p: what differs is float32's order of summation)."""
    assert not any(factored(lm_head, d, 10 ** 6) for d in WIDTHS)
    monkeypatch.setattr(kl_module, "KL_CHUNK_ELEMENTS", 5 * VOCAB)
    x, weights = rows_and_weights(37)
    expected, expected_grads = per_width(lm_head, x, weights)
    kls = grid_kl(lm_head, x, weights)
    grads = torch.autograd.grad(kls.sum(), weights)
    torch.testing.assert_close(kls, expected, rtol=1e-5, atol=0)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_a_bf16_head_takes_the_residual_path_for_every_width_and_matches_each_widths_kl(monkeypatch):
    assert all(factored(head(True), d, 10 ** 6) for d in WIDTHS)  # which a float32 head of that shape would not
    assert_residual_path_matches_each_widths_kl(head(True, torch.bfloat16), monkeypatch)


def test_a_soft_capped_head_takes_the_residual_path_and_matches_each_widths_kl(monkeypatch):
    # Gemma 2's transform: cap * tanh(logits / cap), not linear in h.
    assert_residual_path_matches_each_widths_kl(head(True, scale=0.5, softcap=10.0), monkeypatch)


def test_the_compiled_kl_objective_gives_the_eager_losses_and_gradients(monkeypatch, capsys):
    from torch._dynamo.testing import CompileCounterWithBackend

    # What training runs on a GPU: compile_or_eager(objective_loss(...)). Traced here as there (Dynamo, then
    # AOTAutograd's functional form of grid_kl's in-place and out= ops), run by aot_eager, not inductor: its C++
    # build of these graphs takes minutes on a CPU.
    traced = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=traced))
    monkeypatch.setattr(kl_module, "KL_CHUNK_ELEMENTS", 5 * VOCAB)  # chunks of 5 rows, the last one short
    torch._dynamo.reset()
    lm_head, cfg = head(True), make_config({"objective": "kl"})
    x, weights = rows_and_weights(37)
    assert tuple(factored(lm_head, d, 37) for d in WIDTHS) == (True, True, False)  # both of grid_kl's paths
    models = [DimensionCompressor(D, d) for d in WIDTHS]
    with torch.no_grad():
        for model, w in zip(models, weights):
            model.weight.copy_(w)
    eager, compiled = objective_loss(cfg, lm_head), compile_or_eager(objective_loss(cfg, lm_head), True)
    for rows in (x, 2 * x):  # the second batch runs the graphs compiled on the first
        want = eager(rows, models)
        want_grads = torch.autograd.grad(want.sum(), [m.weight for m in models])
        got = compiled(rows, models)
        got_grads = torch.autograd.grad(got.sum(), [m.weight for m in models])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        for grad, expected in zip(got_grads, want_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert traced.frame_count > 0 and "torch.compile failed" not in capsys.readouterr().out  # traced, no eager fallback
