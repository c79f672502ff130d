"""The cost of keeping W's rows orthonormal: one optimizer step with --orthonormal (Riemannian Adam:
tangent projection, float32 QR retraction, momentum transport) against the same step without.

The step is trm_ray.loop.optimizer_step on an MSE objective, batches of batch_size * max_seq_length
rows (the defaults: 4,096), on one thread (a 1-CPU Ray worker). The retraction's QR is ~4 D'^2 D
FLOP against ~6 N D D' for the step's matmuls, so its share grows with D' / N; a float64 QR runs at
1/64 rate on GPUs such as the A10G. The median of the timed steps after two untimed ones.

    python -m benchmarks.step_cost            # D=2048, D' 256 and 1024: ~1 minute on 2 cores
    python -m benchmarks.step_cost --smoke    # tiny sizes, seconds: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import machine, print_ratio
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import Config, make_config
from trm_ray.loop import make_optimizer, one_thread, optimizer_step
from trm_ray.train import objective_loss

FULL = dict(d_model=2048, d_values=(256, 1024), rows=4096, steps=8)
SMOKE = dict(d_model=64, d_values=(16,), rows=128, steps=3)


def step_seconds(cfg: Config, d_model: int, rows: int, steps: int) -> float:
    """Median wall time of one optimizer_step, after two untimed ones."""
    torch.manual_seed(0)
    model = DimensionCompressor(d_model, cfg.d_compressed)
    optimizer = make_optimizer(model, cfg)
    x = torch.randn(rows, d_model) * torch.logspace(0.5, -0.5, d_model)
    loss = objective_loss(cfg, None)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        optimizer_step([model], optimizer, loss, x, cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    sizes = SMOKE if parser.parse_args(argv).smoke else FULL
    load = os.getloadavg()[0]
    out = {}
    with one_thread():
        for d in sizes["d_values"]:
            seconds = {o: step_seconds(make_config({"d_compressed": d, "orthonormal": o}), sizes["d_model"], sizes["rows"],
                                       sizes["steps"]) for o in (True, False)}
            print(f"step_cost: D={sizes['d_model']}, D'={d}, {sizes['rows']:,} rows: {seconds[True] * 1e3:,.1f} ms with "
                  f"orthonormal rows, {seconds[False] * 1e3:,.1f} ms without")
            name = f"orthonormal_step/plain_step_d{d}"
            out[name] = print_ratio(name, seconds[True], seconds[False], "s a step, median")
    print(machine(load))
    return out


if __name__ == "__main__":
    main()
