"""What matters downstream: the LM head reading the reconstruction instead of the original.

For a last-layer sweep (`hidden_states[-1]` is the final norm's output, which the LM head
reads), the next-token distribution on the reconstructed state is compared with the one on
the original: the KL divergence KL(p_original || p_reconstructed) per token, the increase of
the cross-entropy on the true next token, and how often the top-1 token stays the same. The
same is computed for the PCA reconstruction of each D', so a trained compressor can be set
against the optimum. Runs as one Ray task (on a GPU with --use_gpu) over the whole validation
set, the one trials are selected on. Every score (this, the PCA reference, each epoch's
validation) takes its logits in float32; only training's matmuls are bf16 on a GPU.

The same KL (`next_token_kl`, one code path) is the training loss of `--objective kl`: the
teacher's logits are recomputed from the cached hidden state on the fly, chunked over tokens.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from trm_ray.compressor import DimensionCompressor
from trm_ray.cluster import on_a_gpu
from trm_ray.config import UserError
from trm_ray.model import LMHead, check_lm_head, load_lm_head, log_probs
from trm_ray.files import read_json, write_bytes
from trm_ray.shards import decode_hidden, read_manifest, rows_per_block, shard_paths, side_tables
from trm_ray.names import spectrum_files
from trm_ray.spectrum import eigenvectors, manifest_key, moment_matrix, stored


def split_tables(shards_dir: str, val_fraction: float, seed: int, val_side: bool = True) -> Iterator[pa.Table]:
    """The validation (or training) rows of each shard in turn (whole documents, in document order)."""
    manifest = read_manifest(shards_dir)
    for path in shard_paths(shards_dir, manifest):  # only that side's row groups
        yield from side_tables(path, val_fraction, seed, val_side, rows_per_block(manifest))


def next_tokens(t: pa.Table) -> torch.Tensor:
    """The next token of each row of `t` (-1: none stored): rows are whole documents in document order, so
    row i+1 is the next token of row i when it is the same document's next position."""
    doc, pos, tok = (t[c].to_numpy() for c in ("doc_id", "position", "token_id"))
    follows = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
    targets = np.full(len(doc), -1, dtype=np.int64)
    targets[:-1][follows] = tok[1:][follows]
    return torch.from_numpy(targets)


def validation_rows(shards_dir: str, val_fraction: float, seed: int,
                    max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_tokens` validation rows (None: all): hidden states [N, D] and the next token of each."""
    tables, n = [], 0
    for t in split_tables(shards_dir, val_fraction, seed):  # lazily: only as far as needed
        tables.append(t)
        n += t.num_rows
        if max_tokens is not None and n >= max_tokens:
            break
    t = pa.concat_tables(tables).slice(0, max_tokens)
    return decode_hidden(t["hidden"]), next_tokens(t)


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
    """For each reconstruction x -> x̂, float64 sums over the rows: KL(p(x) || p(x̂)), CE(x̂) - CE(x) on the
    tokens with a known next token, and top-1 agreement (argmax p(x̂) = argmax p(x)). The original's
    logits of a chunk are computed once for all of them."""
    device = lm_head.weight.device
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in reconstructions}
    for x, t in token_chunks(lm_head, hidden, targets):
        x, t = x.to(device), t.to(device)
        logp = log_probs(lm_head, x)
        known, top1 = t >= 0, logp.argmax(-1)
        for k, reconstruct in reconstructions.items():
            _, r, kl = logit_shift(lm_head, x, reconstruct(x), logp)
            sums[k] += torch.tensor([float(kl.sum()),
                                     float((kl[known] - r[known, t[known]]).sum()),  # log p - log q = KL - r
                                     float(((logp + r).argmax(-1) == top1).sum())], dtype=torch.float64)
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


def measure(model_name: str, shards_dir: str, val_fraction: float, seed: int,
            checkpoints: dict[int, str | None]) -> dict[int, dict[str, float]]:
    """For each D': KL, CE increase and top-1 agreement of the exported compressor and of the PCA
    reconstruction over the whole validation set, the set trials were selected on (one shard's
    validation rows at a time, chunked; the original's logits serve every reconstruction). A D'
    without a checkpoint path is the closed form, whose weights are the PCA reconstruction's own
    float32 eigenvectors: it is scored once, as PCA."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Logits in float32 on GPU too: bf16 logits put a noise floor under the small KLs of a wide D'.
    lm_head = load_lm_head(model_name, device, torch.float32)
    vecs = eigenvectors(shards_dir, val_fraction, seed).float().to(device)
    reconstructions: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {}
    for d, path in checkpoints.items():
        reconstructions["pca", d] = lambda x, top=vecs[:, :d]: (x @ top) @ top.T
        if path:
            reconstructions["trained", d] = DimensionCompressor.from_checkpoint(path).to(device).eval()
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in reconstructions}
    tokens = known = 0
    for table in split_tables(shards_dir, val_fraction, seed):
        targets = next_tokens(table)
        part = damage_sums(lm_head, decode_hidden(table["hidden"]), targets, reconstructions)
        sums = {k: sums[k] + part[k] for k in sums}
        tokens, known = tokens + len(targets), known + int((targets >= 0).sum())
    out = {}
    for d, path in checkpoints.items():
        trained, pca = (damage_metrics(sums[kind, d], tokens, known) for kind in ("trained" if path else "pca", "pca"))
        out[d] = {"downstream_kl": trained["kl"], "ce_increase": trained["ce_increase"],
                  "top1_agreement": trained["top1_agreement"],
                  "pca_downstream_kl": pca["kl"], "pca_ce_increase": pca["ce_increase"],
                  "pca_top1_agreement": pca["top1_agreement"], "downstream_efficiency": pca["kl"] / trained["kl"]}
    return out


@torch.no_grad()
def pca_kl(model_name: str, shards_dir: str, val_fraction: float, seed: int, d_values: list[int]) -> dict[str, float]:
    """Mean next-token KL of the PCA reconstruction of each D' over the whole validation set:
    the reference a KL-trained trial's `downstream_efficiency` is measured against, every epoch
    (one teacher pass for every D', `grid_kl`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_head = load_lm_head(model_name, device, torch.float32)  # as `measure` and the trials' validation score
    vecs = eigenvectors(shards_dir, val_fraction, seed).float().to(device)
    sums, n = torch.zeros(len(d_values), dtype=torch.float64), 0
    for table in split_tables(shards_dir, val_fraction, seed):
        x = decode_hidden(table["hidden"]).to(device)
        sums += grid_kl(lm_head, x, [vecs[:, :d].T for d in d_values]).double().cpu()
        n += x.shape[0]
    return {str(d): s / n for d, s in zip(d_values, sums.tolist())}


FISHER_TOKENS = 2 ** 16  # training rows the head's mean Fisher information (a D x D average) is estimated on


@torch.no_grad()
def mean_fisher(lm_head: LMHead, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """F = E[Jᵀ(diag p - ppᵀ)J] over the rows of `batches` (float64 [D, D]), and how many rows:
    the Fisher information of the head's next-token distribution in its input, so that for a small
    step δ, KL(p(h) || p(h + δ)) ≈ ½ δᵀ F_h δ. J = diag(t') U is the logits' Jacobian in h, t' the
    slope of the head's transform (its scale for an affine head), so F = Uᵀ diag(E[p t'²]) U - E[vvᵀ], v = Uᵀ(p t')."""
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
    return ((u.T * p_sum) @ u - pu2) / n, n


def fisher_basis(fisher: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns whose first k span, for every k, PCA's subspace in the metric F: F^-½
    times the top eigenvectors of F^½ Σ F^½, orthonormalised (phase 2 needs a projection)."""
    evals, evecs = torch.linalg.eigh((fisher + fisher.T) / 2)
    evals = evals.clamp_min(1e-6 * float(evals.max()))  # a direction no logit reads would make F^-½ blow up
    half, inv_half = ((evecs * evals ** e) @ evecs.T for e in (0.5, -0.5))
    g_evals, g_vecs = torch.linalg.eigh(half @ sigma @ half)
    return torch.linalg.qr(inv_half @ g_vecs[:, g_evals.argsort(descending=True)])[0]


def quadratic_kl(fisher: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[D + 1]: for every k, ½ tr(F (I - P_k) Σ (I - P_k)), P_k the projection onto basis[:, :k]
    (orthonormal columns): the mean KL of the reconstruction P_k x to second order, E[½ δᵀ F δ] with
    δ = (I - P_k) x, F the mean Fisher information and Σ = E[xxᵀ]. In the basis's coordinates it is
    half the sum of (F̃ ∘ Σ̃)_ij over i, j >= k, every k at once from one reversed 2-D cumulative sum."""
    m = (basis.T @ fisher @ basis) * (basis.T @ sigma @ basis)
    tail = m.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1).diagonal()
    return 0.5 * torch.cat([tail, tail.new_zeros(1)])


def fisher_start(model_name: str, shards_dir: str, val_fraction: float, seed: int) -> None:
    """Store `--init fisher`'s start beside the spectrum: `fisher_basis` of the head's mean Fisher
    information F (`mean_fisher`, on the first FISHER_TOKENS training rows) and the spectrum's Σ, with
    the quadratic KL of it and of PCA at every D' (`start_basis` starts from the better of the two).

    Where PCA keeps the directions of most energy, this keeps those that move the logits most. But
    after the QR it is the orthogonal projection onto the Fisher optimum's subspace, not the optimum
    itself, and PCA's subspace can score better."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_head = load_lm_head(model_name, device, torch.float32)

    def training_rows() -> Iterator[torch.Tensor]:
        n = 0
        for table in split_tables(shards_dir, val_fraction, seed, val_side=False):
            yield decode_hidden(table["hidden"][:FISHER_TOKENS - n]).to(device)
            n += min(table.num_rows, FISHER_TOKENS - n)
            if n >= FISHER_TOKENS:
                return

    fisher, n = mean_fisher(lm_head, training_rows())
    summary = read_json(spectrum_files(shards_dir, val_fraction, seed)[0])
    vecs = eigenvectors(shards_dir, val_fraction, seed).to(device)
    sigma = moment_matrix(summary, vecs)
    store_fisher_start(shards_dir, val_fraction, seed, fisher, sigma, vecs, n)


def store_fisher_start(shards_dir: str, val_fraction: float, seed: int, fisher: torch.Tensor, sigma: torch.Tensor,
                       pca: torch.Tensor, tokens: int) -> None:
    """Write `fisher_basis(fisher, sigma)` and the quadratic KL of it and of `pca` at every D'."""
    basis = fisher_basis(fisher, sigma)
    scores = {"fisher": quadratic_kl(fisher, sigma, basis).cpu(), "pca": quadratic_kl(fisher, sigma, pca).cpu()}
    buf = io.BytesIO()
    torch.save({"eigenvectors": basis.cpu(), "quadratic_kl": scores, "split": {"val_fraction": val_fraction, "seed": seed},
                "tokens": tokens, "manifest": manifest_key(shards_dir)}, buf)
    write_bytes(spectrum_files(shards_dir, val_fraction, seed, "fisher")[1], buf.getvalue())


def start_basis(shards_dir: str, val_fraction: float, seed: int, init: str, d: int) -> torch.Tensor:
    """[D, d]: the start of `--init pca` (the top-d eigenvectors), or of `--init fisher`: the Fisher
    basis's top d where its quadratic KL at this d is at most PCA's, else PCA's, so the Fisher start
    is never worse than PCA's under the quadratic model of the training rows' KL."""
    if init == "fisher":
        found = stored(shards_dir, val_fraction, seed, "fisher")
        if found is None or "quadratic_kl" not in found:
            raise UserError(f"{spectrum_files(shards_dir, val_fraction, seed, 'fisher')[1]} is missing or was computed "
                            "from other shards: a KL sweep with --init fisher computes it again")
        if found["quadratic_kl"]["fisher"][d] <= found["quadratic_kl"]["pca"][d]:
            return found["eigenvectors"][:, :d]
    return eigenvectors(shards_dir, val_fraction, seed)[:, :d]


def check_head(cfg: Any) -> None:
    """At a sweep's start, before anything runs: the LM head it will read (a KL objective's, or the downstream
    pass's of a last-layer sweep) gives the model's own logits (`check_lm_head`; else a one-line refusal).
    A model without one (a sentence encoder) cannot train on the KL; for an mse sweep it is said here, once,
    and the downstream pass is skipped: its rows are complete without a KL that never existed."""
    if (cfg.objective == "mse" and (cfg.layer != -1 or not cfg.downstream)) or check_lm_head(cfg.model_name):
        return
    if cfg.objective != "mse":
        raise UserError(f"{cfg.model_name} has no LM head (its weight files hold none): --objective {cfg.objective} "
                        "trains on the head's next-token KL; use --objective mse")
    print(f"sweep: {cfg.model_name} has no LM head (its weight files hold none): there is no next-token KL to score "
          "against, so the downstream pass is skipped", flush=True)


def add_downstream(rows: list[dict[str, Any]], cfg: Any, manifest: dict[str, Any]) -> None:
    """Fill the downstream columns of the exported rows (last-layer sweeps of a model with an LM head only)."""
    if manifest["layer"] != -1 or not cfg.downstream or not check_lm_head(cfg.model_name):
        return
    checkpoints = {r["d_compressed"]: None if r["obtained_by"] == "closed_form" else r["checkpoint"]
                   for r in rows if "checkpoint" in r}
    found = on_a_gpu(cfg.use_gpu, measure, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, checkpoints)
    for r in rows:
        r.update(found.get(r["d_compressed"], {}))
