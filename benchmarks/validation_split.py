"""Validation split over a trial's workers: the wall time of one epoch's scoring of a KL trial on 1 vs 2 ranks.

What a Train worker's `validation` does, without Ray: every rank reads the same validation batches (bf16 rows
of synthetic shards, written with trm_ray's own shard code) and scores its share of each (`Comm.part`) with
`loop.evaluate` through an LM head of a real LM's width (SmolLM2-135M's: D=576, vocabulary 49,152; random
weights: the cost does not depend on them), every D' of the grid at once; the ranks' sums are all-reduced
over gloo. Each rank runs on one thread, as a 1-CPU Ray worker does. The metrics of the two runs must agree
(printed), the time is each run's slowest rank.

    python -m benchmarks.validation_split           # D=576, V=49,152, D' 32/64/128, 4,096 validation rows
    python -m benchmarks.validation_split --smoke   # tiny sizes: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import machine, print_ratio, write_synthetic_shards
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import make_config
from trm_ray.kl import LMHead
from trm_ray.loop import Comm, evaluate
from trm_ray.hidden import decode_hidden
from trm_ray.shards import split_tables

FULL = dict(d_model=576, vocab=49152, d_values=(32, 64, 128), docs=64, seq=128, batch_rows=1024)
SMOKE = dict(d_model=64, vocab=1000, d_values=(8, 16), docs=16, seq=32, batch_rows=64)


def score(rank: int, world: int, port: int, sizes: dict, shards_dir: str, out: str) -> None:
    """One rank: its share of every validation batch scored, timed from a barrier to the all-reduced metrics."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm, gen = Comm(rank, world), torch.Generator().manual_seed(0)
    head = LMHead(0.05 * torch.randn(sizes["vocab"], sizes["d_model"], generator=gen), None)
    torch.manual_seed(0)
    models = [DimensionCompressor(sizes["d_model"], d).eval() for d in sizes["d_values"]]
    val = torch.cat([decode_hidden(t["hidden"]) for t in split_tables(shards_dir, 0.5, 42)])
    mean = val.mean(0)
    scored = 0

    def shares():
        nonlocal scored
        for batch in val.split(sizes["batch_rows"]):
            mine = batch[comm.part(len(batch))]
            scored += len(mine)
            yield mine

    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    metrics = evaluate(models, shares(), mean, head, comm)
    torch.save({"s": time.perf_counter() - t0, "rows": scored, "total": len(val), "metrics": metrics}, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, sizes: dict, shards_dir: str, out: str) -> list[dict]:
    if world == 1:
        score(0, 1, 0, sizes, shards_dir, out)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(score, args=(world, port, sizes, shards_dir, out), nprocs=world)
    return [torch.load(f"{out}.{r}") for r in range(world)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.validation_split", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    sizes = SMOKE if parser.parse_args(argv).smoke else FULL
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        # Half the documents held out: the validation rows the benchmark scores.
        cfg = make_config(dict(model_name="synthetic", storage_dtype="bfloat16", output_dir=work_dir, val_fraction=0.5,
                               num_samples=sizes["docs"], max_seq_length=sizes["seq"], docs_per_shard=16))
        write_synthetic_shards(cfg, sizes["d_model"])
        one = run(1, sizes, cfg.shards_path, os.path.join(work_dir, "one"))
        two = run(2, sizes, cfg.shards_path, os.path.join(work_dir, "two"))
    agree = max(abs(a[k] / b[k] - 1) for a, b in zip(one[0]["metrics"], two[0]["metrics"]) for k in ("mse", "downstream_kl"))
    print(f"validation_split: D={sizes['d_model']}, vocabulary {sizes['vocab']:,}, D' {list(sizes['d_values'])}, "
          f"{one[0]['total']:,} validation rows in batches of {sizes['batch_rows']:,}, one thread a rank")
    print(machine(load))
    print(f"1 rank: {one[0]['s']:.2f}s, {one[0]['rows']:,} rows | 2 ranks: "
          + ", ".join(f"rank {r}: {t['s']:.2f}s, {t['rows']:,} rows" for r, t in enumerate(two)))
    print(f"largest relative difference of mse and downstream_kl between the runs: {agree:.1e}")
    slowest = max(t["s"] for t in two)
    return {"one_rank_s/two_ranks_s": print_ratio("one_rank_s/two_ranks_s", one[0]["s"], slowest, "s of scoring"),
            "rows_rank0_two/one": print_ratio("rows_rank0_two/one", two[0]["rows"], one[0]["rows"], "rows scored by rank 0")}


if __name__ == "__main__":
    main()
