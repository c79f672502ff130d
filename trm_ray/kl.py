"""The LM head and every KL this project takes through it, on tensors: what a reconstruction costs downstream.

The head's next-token distribution on the reconstructed state is compared with the one on the original: the
KL divergence KL(p_original || p_reconstructed) per token, the increase of the cross-entropy on the true next
token, and how often the top-1 token stays the same. Every score takes its logits in float32; only training's
matmuls are bf16 on a GPU. The same KL (`next_token_kl`, one code path; `grid_kl` for a grid of widths) is the
training loss of `--objective kl`: the teacher's logits are recomputed from the hidden state on the fly,
chunked over tokens. The mean Fisher information of the head is the KL's second-order term (`--init fisher`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn


class LMHead(nn.Module):
    """The model's output embedding alone, frozen, with the config's transform of its logits: used
    like the nn.Linear it replaces (`weight` [V, D], `bias`, `in_features`, `out_features`), and
    `forward(h)` is the model's own final logits, in float32.

    `affine`: the logits are scale * (U h + b), so logits(x̂) - logits(x) = scale * (x̂ - x) Uᵀ and
    the KL can be taken from that small residual alone (`logit_shift`); a
    soft-capped head is not, and the KL code takes its transform and slope instead."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.scale, self.softcap = scale, softcap

    @property
    def affine(self) -> bool:
        return self.softcap is None

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """U h + b in the head's dtype, before the config's transform."""
        return nn.functional.linear(h.to(self.weight.dtype), self.weight, self.bias)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """The config's transform of raw logits (elementwise)."""
        logits = raw * self.scale if self.scale != 1.0 else raw
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    def slope(self, raw: torch.Tensor) -> torch.Tensor:
        """d transform / d raw, elementwise: for soft-capping scale * (1 - tanh²(scale * raw / cap))."""
        if self.softcap is None:
            return torch.full_like(raw, self.scale)
        return self.scale * (1 - torch.tanh(raw * self.scale / self.softcap) ** 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(self.raw(h).float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}, softcap={self.softcap}"


def log_probs(lm_head: LMHead, h: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [N, V]: the matmul in the head's dtype, the transform and softmax in float32."""
    return torch.log_softmax(lm_head(h), -1)


def logit_shift(lm_head: LMHead, x: torch.Tensor, x_hat: torch.Tensor,
                logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p [N, V], r [N, V], KL(p || q) [N]) for the head reading x (p) and x_hat (q), where r is the
    student's logits minus the teacher's, centred under p: log q = log p + r - KL.

    For an affine head the student's logits are the teacher's plus scale * U(x_hat - x), the small
    residual through the head: the KL depends only on that difference, and a bf16 head's rounding of
    logits of 16-32 (steps of 0.125) would otherwise be most of what a small residual's KL measures
    (a soft-capped head: its transform of the teacher's raw logits plus that residual, minus its
    transform of the teacher's, in float32). The KL is taken as
    log E_p[e^r] = log1p(E_p[expm1(r) - r]) (E_p[r] = 0), a sum of second-order terms that float32
    resolves, not as a difference of two log-partitions that each carry float32's rounding. `logp`: the
    teacher's, when already computed (one teacher pass serves several reconstructions)."""
    logp = log_probs(lm_head, x) if logp is None else logp
    p, u = logp.exp(), lm_head.weight
    r = ((x_hat - x).to(u.dtype) @ u.T).float()  # raw(x_hat) - raw(x)
    if lm_head.affine:
        r = lm_head.scale * r
    else:
        raw = lm_head.raw(x).float()
        r = lm_head.transform(raw + r) - lm_head.transform(raw)
    r = r - (p * r).sum(-1, keepdim=True)
    small = r.abs().amax(-1) < 1  # rows where expm1(r) - r holds the KL to float32 precision
    rc = r.clamp(-1, 1)
    kl = torch.where(small, torch.log1p((p * (torch.expm1(rc) - rc)).sum(-1)), torch.logsumexp(logp + r, -1))
    return logp, r, kl


def q_minus_p(logp: torch.Tensor, r: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """q - p [N, V], the KL's gradient in the student's logits, without the cancellation of
    subtracting two nearly equal probabilities where the shift log q - log p is small."""
    shift = r - kl[:, None]
    p = logp.exp()
    return torch.where(shift.abs() < 1, p * torch.expm1(shift.clamp(-1, 1)), torch.exp(logp + shift) - p)


KL_CHUNK_ELEMENTS = 2 ** 25  # logits per chunk: 128 MiB of float32, ~260 tokens of a 128k vocabulary


def token_chunks(lm_head: LMHead, *rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The same consecutive slices of each of `rows`, few enough tokens a slice that its [tokens, V]
    logits stay within KL_CHUNK_ELEMENTS floats."""
    step = max(1, KL_CHUNK_ELEMENTS // lm_head.out_features)
    for i in range(0, rows[0].shape[0], step):
        yield tuple(r[i:i + step] for r in rows)


def kl_grad(lm_head: LMHead, logp: torch.Tensor, r: torch.Tensor, kl: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """dKL/dx_hat [rows, D] from `logit_shift`'s (log p, r, KL): ((q - p) t') U, t' the slope of the head's
    transform at the student's raw logits (the scale, for an affine head)."""
    slope = lm_head.scale if lm_head.affine else lm_head.slope(lm_head.raw(x_hat).float())
    return ((q_minus_p(logp, r, kl) * slope).to(lm_head.weight.dtype) @ lm_head.weight).to(x_hat.dtype)


class _FusedKL(torch.autograd.Function):
    """Σ KL(p || q) over rows with its gradient in x_hat taken in the same pass over the logits.

    For the student's logits s = t(U x_hat) (t the head's transform), dKL/ds = q - p, so dKL/dx_hat =
    ((q - p) t') U, t' the transform's slope (the scale, for an affine head): per chunk, the
    teacher's matmul, the residual's (`logit_shift`) and that one, and only [rows, D] kept for the backward. Autograd
    with checkpointing did five ([rows, V] logits cannot be kept): the teacher and the student again
    in the backward, and the softmax's backward on top."""

    @staticmethod
    def forward(ctx: Any, x_hat: torch.Tensor, x: torch.Tensor, lm_head: LMHead) -> torch.Tensor:
        total, grads = torch.zeros((), device=x.device), []
        for xc, xc_hat in token_chunks(lm_head, x, x_hat):
            logp, r, kl = logit_shift(lm_head, xc, xc_hat)
            total += kl.sum()
            if ctx.needs_input_grad[0]:
                grads.append(kl_grad(lm_head, logp, r, kl, xc_hat))
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.cat(grads))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_total * grad, None, None


def next_token_kl(lm_head: LMHead, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(softmax(head(x)) || softmax(head(x_hat))), differentiable in x_hat (not in
    the head, which stays frozen). Chunked over tokens so that [rows, V] logits never exist at once:
    memory stays at one chunk's logits whatever the batch."""
    return _FusedKL.apply(x_hat, x, lm_head)


def factored(lm_head: LMHead, d_compressed: int, rows: int) -> bool:
    """Whether `grid_kl` takes a width's student logits as (x Wᵀ)(U Wᵀ)ᵀ: where that costs no more FLOPs than the
    residual through the full D, 6 V D' + 4 V D D' / N a token (the three [V, D'] matmuls, and A = U Wᵀ with
    its gradient once a call) against 4 V D. Only for a float32 head: the student's logits minus the teacher's
    is then a difference of two logits of ~20, which bf16 could not resolve. Only for an affine head: a
    soft-capped head's logits are not linear in h."""
    d = lm_head.in_features
    return (lm_head.affine and lm_head.weight.dtype == torch.float32
            and 6 * d_compressed + 4 * d * d_compressed / rows <= 4 * d)


def _student(logp: torch.Tensor, p: torch.Tensor, r: torch.Tensor, e: torch.Tensor,
             grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(KL(p || q) [rows], q - p [rows, V] or None) of a student whose logits are the teacher's plus `r`:
    `logit_shift`'s KL and `q_minus_p`'s gradient, the same formulas, computed in place in `r` and `e`
    (buffers of the chunk's shape; q - p is left in `e`). On a CPU each pass that allocates its [rows, V]
    costs as much as a narrow width's matmul, ten times an in-place one."""
    r -= torch.mul(p, r, out=e).sum(-1, keepdim=True)  # a sum, not a batched dot product: MKL's loses 1e-4 over V
    low, high = r.aminmax(dim=-1)
    kl = torch.log1p(torch.expm1(r, out=e).sub_(r).mul_(p).sum(-1))  # KL to float32 precision where every |r| < 1
    large = torch.maximum(-low, high) >= 1
    if large.any():
        kl = torch.where(large, torch.logsumexp(torch.add(logp, r, out=e), -1), kl)
    if not grad:
        return kl, None
    shift = r.sub_(kl[:, None])  # log q - log p
    g = torch.expm1(shift, out=e).mul_(p)  # q - p without cancellation where |shift| < 1
    if bool(((high - kl >= 1) | (low - kl <= -1)).any()):
        near = shift.gt(-1).logical_and_(shift.lt(1))
        torch.where(near, g, shift.add_(logp).exp_().sub_(p), out=g)
    return kl, g


class _GridKL(torch.autograd.Function):
    """[k]: Σ KL(p(x) || p(W_iᵀ W_i x)) over rows for each W_i, with every gradient in W_i taken in the same
    pass over the logits as the values, as `_FusedKL` does, and only [D'_i, D] kept for the backward.

    Per chunk the teacher's logits once; then each width's student, either factored (`factored`: A_i = U W_iᵀ
    formed once a call, student logits z_i A_iᵀ with z_i = x W_iᵀ, gradients dA_i = Σ gᵀ z_i and dz_i = g A_i
    for g = q - p, so dW_i = dA_iᵀ U + dz_iᵀ x) or through the residual (`logit_shift` with the shared log p,
    gradient (q - p) U through x̂ = Wᵀ W x)."""

    @staticmethod
    def forward(ctx: Any, lm_head: LMHead, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        u, b, s = lm_head.weight, lm_head.bias, lm_head.scale
        grad = any(ctx.needs_input_grad[2:])
        paths = [factored(lm_head, w.shape[0], x.shape[0]) for w in weights]
        z = [x @ w.T for w in weights]
        a = [w @ u.T if f else None for w, f in zip(weights, paths)]  # A_iᵀ [D'_i, V]
        da = [torch.zeros_like(ai) if ai is not None and grad else None for ai in a]
        dz: list[list[torch.Tensor]] = [[] for _ in weights]
        dw = [torch.zeros_like(w) if grad and not f else None for w, f in zip(weights, paths)]
        total = x.new_zeros(len(weights))
        for xc, *zc in token_chunks(lm_head, x, *z):
            if any(paths):  # float32, affine: the teacher's raw logits without the bias, which cancels in r
                t = xc @ u.T
                logp = torch.log_softmax(s * (t if b is None else t + b), -1)
                r, e = torch.empty_like(t), torch.empty_like(t)  # every factored width's scratch
            else:
                logp = log_probs(lm_head, xc)
            p = logp.exp()
            for i, w in enumerate(weights):
                if paths[i]:
                    kl, g = _student(logp, p, torch.addmm(t, zc[i], a[i], beta=-s, alpha=s, out=r), e, grad)
                    if grad:  # the raw logits' gradient is the scale times the logits'
                        da[i].addmm_(zc[i].T, g, alpha=s)
                        dz[i].append(s * (g @ a[i].T))
                else:
                    x_hat = zc[i] @ w
                    _, r_i, kl = logit_shift(lm_head, xc, x_hat, logp)
                    if grad:
                        g = kl_grad(lm_head, logp, r_i, kl, x_hat)
                        dw[i] += zc[i].T @ g + (g @ w.T).T @ xc
                total[i] += kl.sum()
        if grad:
            for i in range(len(weights)):
                if paths[i]:
                    dw[i] = da[i] @ u + torch.cat(dz[i]).T @ x
            ctx.save_for_backward(*dw)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *(g * dw for g, dw in zip(grad_total, ctx.saved_tensors)))


def grid_kl(lm_head: LMHead, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """[k]: for each W_i [D'_i, D] of `weights`, Σ over rows of KL(p(x) || p(W_iᵀ W_i x)), differentiable in
    every W_i: `next_token_kl` of each width's reconstruction, with one teacher pass for all of them, so that
    one read of a batch trains every D' of a sweep's grid."""
    return _GridKL.apply(lm_head, x, *weights)


@torch.no_grad()
def damage_sums(lm_head: LMHead, hidden: torch.Tensor, targets: torch.Tensor,
                reconstructions: dict[Any, Callable[[torch.Tensor], torch.Tensor]]) -> dict[Any, torch.Tensor]:
    """For each reconstruction x -> x̂, float64 sums over the rows (on the CPU): KL(p(x) || p(x̂)), CE(x̂) - CE(x)
    on the tokens with a known next token, and top-1 agreement (argmax p(x̂) = argmax p(x)). The original's
    logits of a chunk are computed once for all of them; the sums stay on the head's device until the end,
    so a GPU never waits for the host inside the loop."""
    device = lm_head.weight.device
    sums = {k: torch.zeros(3, dtype=torch.float64, device=device) for k in reconstructions}
    for x, t in token_chunks(lm_head, hidden, targets):
        x, t = x.to(device), t.to(device)
        logp = log_probs(lm_head, x)
        known, top1 = t >= 0, logp.argmax(-1)
        for k, reconstruct in reconstructions.items():
            _, r, kl = logit_shift(lm_head, x, reconstruct(x), logp)
            ce = torch.where(known, kl - r.gather(1, t.clamp(min=0)[:, None])[:, 0], 0)  # log p - log q = KL - r
            sums[k] += torch.stack([kl.sum(), ce.sum(), ((logp + r).argmax(-1) == top1).sum()]).double()
    return {k: v.cpu() for k, v in sums.items()}


@torch.no_grad()
def kl_sums(lm_head: LMHead, hidden: torch.Tensor, reconstructions: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """[k] float64 on the head's device: Σ over rows of KL(p(x) || p(x̂)) for each reconstruction, `damage_sums`'s
    KL alone (what an epoch's validation reads), one teacher pass a chunk for all, no host sync inside the loop."""
    device = lm_head.weight.device
    sums = torch.zeros(len(reconstructions), dtype=torch.float64, device=device)
    for (x,) in token_chunks(lm_head, hidden):
        x = x.to(device)
        logp = log_probs(lm_head, x)
        sums += torch.stack([logit_shift(lm_head, x, f(x), logp)[2].sum() for f in reconstructions]).double()
    return sums


def damage_metrics(sums: torch.Tensor, tokens: int, known: int) -> dict[str, float]:
    """Means of `damage_sums`: KL and top-1 agreement per token, CE increase per token with a known next token."""
    kl, ce, agree = sums.tolist()
    return {"kl": kl / tokens, "ce_increase": ce / max(known, 1), "top1_agreement": agree / tokens}


def next_token_damage(lm_head: LMHead, hidden: torch.Tensor, targets: torch.Tensor,
                      reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Mean KL(p(x) || p(x̂)), CE increase and top-1 agreement of one reconstruction over `hidden`."""
    sums = damage_sums(lm_head, hidden, targets, {0: reconstruct})[0]
    return damage_metrics(sums, hidden.shape[0], int((targets >= 0).sum()))


@torch.no_grad()
def mean_fisher(lm_head: LMHead, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """F = E[Jᵀ(diag p - ppᵀ)J] over the rows of `batches` (float64 [D, D]), and how many rows:
    the Fisher information of the head's next-token distribution in its input, so that for a small
    step δ, KL(p(h) || p(h + δ)) ≈ ½ δᵀ F_h δ."""
    total, n = fisher_sum(lm_head, batches)
    return total / max(n, 1), n


def fisher_sum(lm_head: LMHead, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Σ Jᵀ(diag p - ppᵀ)J over the rows of `batches` (float64 [D, D]; summed, so that tasks sharing the rows add
    up), and how many rows. J = diag(t') U is the logits' Jacobian in h, t' the slope of the head's transform (its
    scale for an affine head), so the sum is Uᵀ diag(Σ p t'²) U - Σ vvᵀ, v = Uᵀ(p t')."""
    u = lm_head.weight
    p_sum = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
    pu2 = torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64, device=u.device)
    n = 0
    for x in batches:
        for (xc,) in token_chunks(lm_head, x):
            slope = lm_head.scale if lm_head.affine else lm_head.slope(lm_head.raw(xc).float())
            pt = log_probs(lm_head, xc).exp() * slope
            pu = (pt.to(u.dtype) @ u).double()
            p_sum += (pt * slope).sum(0).double()
            pu2 += pu.T @ pu
        n += len(x)
    u = u.double()
    return (u.T * p_sum) @ u - pu2, n
