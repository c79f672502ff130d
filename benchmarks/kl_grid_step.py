"""One LM-head pass for every D' of a KL grid: a step of `trm_ray.kl.grid_kl` over all widths
against today's, each D' its own `next_token_kl` step (the teacher's logits recomputed per D').

On the SmolLM3 head's shape (D=2048, V=128,256) with random weights, which are honest for FLOPs: the
head's logits scaled to a std of 3 (the largest ~13), rows with a decaying spectrum in a random basis
and each W its top D' directions (PCA-like compressors, so the KLs of the wide D' are small, where
precision matters). One forward and backward of each, float32, one thread (a 1-CPU Ray worker), on
the same batch; the KL values and gradients of the two are compared. Today's step is ~6 V D FLOP a
token a width; the shared one 2 V D for the teacher and, a width, 6 V D' + 4 V D D' / N factored or
4 V D through the residual, whichever is fewer (`kl.factored`).

    python -m benchmarks.kl_grid_step             # 4,096 rows, D' 64..1024: ~15 minutes on 2 cores
    python -m benchmarks.kl_grid_step --rows 512  # a quicker look (A = U Wᵀ weighs more at fewer rows)
    python -m benchmarks.kl_grid_step --smoke     # tiny sizes, seconds: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

from benchmarks.common import gaussian_rows, machine, print_ratio
from trm_ray.kl import factored, grid_kl, next_token_kl
from trm_ray.kl import LMHead
from trm_ray.loop import one_thread

FULL = dict(d_model=2048, vocab=128_256, d_values=(64, 128, 256, 512, 1024), rows=4096)  # batch_size 8 x max_seq_length 512
SMOKE = dict(d_model=64, vocab=1000, d_values=(8, 16, 32), rows=96)


def problem(d_model: int, vocab: int, d_values: tuple[int, ...], rows: int) -> tuple[LMHead, torch.Tensor, list[torch.Tensor]]:
    """(head, rows, one W per width)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d_model, d_model, generator=gen))[0]
    x = gaussian_rows(gen, rows, d_model) @ basis.T
    lm_head = LMHead(torch.randn(vocab, d_model, generator=gen) * 3 / float(x.norm(dim=1).mean()), None)
    return lm_head, x, [basis[:, :d].T.contiguous().requires_grad_(True) for d in d_values]


def per_width_step(lm_head: LMHead, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Today's: each D' its own forward and backward of next_token_kl (as objective_loss's KL)."""
    kls = []
    for w in weights:
        kl = next_token_kl(lm_head, x, (x @ w.T) @ w)
        kl.backward()
        kls.append(kl.detach())
    return torch.stack(kls)


def grid_step(lm_head: LMHead, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """The new: one forward and backward of grid_kl for every D'."""
    kls = grid_kl(lm_head, x, weights)
    kls.sum().backward()
    return kls.detach()


def timed(step: Callable[[LMHead, torch.Tensor, list[torch.Tensor]], torch.Tensor], lm_head: LMHead, x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """(seconds, KLs, gradients) of one call of `step`."""
    for w in weights:
        w.grad = None
    t0 = time.perf_counter()
    kls = step(lm_head, x, weights)
    return time.perf_counter() - t0, kls, [w.grad.clone() for w in weights]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kl_grid_step", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    parser.add_argument("--rows", type=int, help="rows a step (default 4,096: batch_size 8 x max_seq_length 512)")
    args = parser.parse_args(argv)
    sizes = {**(SMOKE if args.smoke else FULL), **({"rows": args.rows} if args.rows else {})}
    load = os.getloadavg()[0]
    lm_head, x, weights = problem(**sizes)
    with one_thread():
        today, kl_today, grads_today = timed(per_width_step, lm_head, x, weights)
        new, kl_new, grads_new = timed(grid_step, lm_head, x, weights)
    n, d_values = sizes["rows"], sizes["d_values"]
    paths = ", ".join(f"{d}: {'factored' if factored(lm_head, d, n) else 'residual'}" for d in d_values)
    print(f"kl_grid_step: D={sizes['d_model']}, V={sizes['vocab']:,}, {n:,} rows, D' {paths}")
    print(f"  KL per token, today's: {', '.join(f'{float(k) / n:.4g}' for k in kl_today)}")
    print(f"  max relative difference of the KLs: {float(((kl_new - kl_today) / kl_today).abs().max()):.2g}; "
          f"of the gradients (norm): {max(float((a - b).norm() / b.norm()) for a, b in zip(grads_new, grads_today)):.2g}")
    print(f"  s per token: {today / n:.4g} today ({today:.1f} s a step), {new / n:.4g} shared ({new:.1f} s)")
    print(machine(load))
    name = f"grid_step/per_width_steps_d{'_'.join(map(str, d_values))}"
    return {name: print_ratio(name, new / n, today / n, "s per token, one grid_kl step / a next_token_kl step per D'")}


if __name__ == "__main__":
    main()
