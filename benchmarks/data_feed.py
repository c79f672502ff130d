"""Data feed: rows/s of Ray Data iter_batches(pyarrow) + decode_hidden over the shards vs a plain pyarrow read.

The Ray side is trm_ray's own path: trm_ray.train.load_splits (a read task per shard plus the
train/validation filter) iterated by trm_ray.train.hidden_batches in training-sized batches,
streamed from the files, after .materialize() (what trm_ray.sweep.datasets does when the
shards fit in the object store), and materialized with the training loop's local shuffle;
and both as an epoch of training reads them, in that epoch's own block order
(trm_ray.train.epoch_rows: shards read in a permuted order, or materialized blocks permuted); and an epoch
of the materialized rows read by two ranks at once, each its share: cut by each rank itself
(trm_ray.train.epoch_rows with a rank and world) against Ray Data's streaming_split (a coordinator actor an epoch).
The baseline reads the same files with pyarrow.parquet.read_table, applies the same
filter and decodes them to one float32 tensor. Every figure is the best of a few passes,
taken round robin.

What the feed leaves to the training device: the batches leave it in the shards' dtype
(trm_ray.hidden.stored_hidden, bf16 here: 2 bytes a value to move) and are converted to float32 on
the device; before, the feed converted them on the CPU (decode_hidden) and moved 4 bytes a value.
`feed_cpu_side_*` time the CPU side of each on the materialized shards; on this CPU-only machine
the device is the CPU, so there the conversion only moves, it is not saved.

    python -m benchmarks.data_feed            # 2 shards of 131,072 rows x 2048 bf16 (512 MiB)
    python -m benchmarks.data_feed --smoke    # tiny sizes, seconds: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from benchmarks.common import machine, print_ratio, read_train_rows, write_synthetic_shards
from trm_ray.cluster import connect
from trm_ray.config import make_config
from trm_ray.hidden import decode_hidden, stored_hidden
from trm_ray.shards import split_counts
from trm_ray.train import load_splits
from trm_ray.train import epoch_rows, hidden_batches

FULL = dict(d_model=2048, num_samples=512, max_seq_length=512, docs_per_shard=256, batch_size=8, passes=3)
SMOKE = dict(d_model=64, num_samples=48, max_seq_length=32, docs_per_shard=16, batch_size=4, passes=2)


def best_rates(readers: dict[str, Callable[[], int]], passes: int) -> dict[str, float]:
    """Rows/s of each reader's fastest pass (a reader returns the rows it read). Passes go round
    robin, so a change in the machine's load hits every reader alike."""
    best = dict.fromkeys(readers, 0.0)
    for _ in range(passes):
        for name, read in readers.items():
            t0 = time.perf_counter()
            rows = read()
            best[name] = max(best[name], rows / (time.perf_counter() - t0))
    return best


def feed(dataset: Any, rows: int, shuffle_seed: int | None = None) -> Callable[[], int]:
    """One pass over `dataset` as the training loop takes it: decoded float32 batches of `rows` rows."""
    return lambda: sum(len(x) for x in hidden_batches(dataset, rows, torch.device("cpu"), shuffle_seed))


def cpu_side(dataset: Any, rows: int, convert: Callable[[Any], torch.Tensor]) -> Callable[[], int]:
    """One pass over `dataset` doing only what the worker's CPU does before a batch goes to its device."""
    return lambda: sum(len(convert(b["hidden"])) for b in dataset.iter_batches(batch_size=rows, batch_format="pyarrow"))


def two_ranks(shares: Callable[[], list[Any]], rows: int) -> Callable[[], int]:
    """One epoch read by two ranks at once, each its own share (`shares()`: built each epoch, as the workers
    build theirs), in two threads standing in for the two workers."""
    def read() -> int:
        with ThreadPoolExecutor(2) as pool:
            return sum(pool.map(lambda share: sum(len(x) for x in hidden_batches(share, rows, torch.device("cpu"))), shares()))
    return read


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_feed", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    sizes = SMOKE if parser.parse_args(argv).smoke else FULL
    passes, load = sizes["passes"], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = make_config({k: v for k, v in sizes.items() if k not in ("d_model", "passes")} | dict(
            model_name="synthetic", storage_dtype="bfloat16", output_dir=work_dir, num_cpus=8))
        connect(cfg)
        manifest = write_synthetic_shards(cfg, sizes["d_model"])
        rows = cfg.batch_size * cfg.max_seq_length
        train_rows = split_counts(manifest, cfg.val_fraction, cfg.seed)["train_tokens"]
        train, _ = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
        t0 = time.perf_counter()
        cached = train.materialize()
        materialize_s = time.perf_counter() - t0
        rates = best_rates({
            "pyarrow": lambda: len(read_train_rows(cfg, manifest)),
            "ray_streamed": feed(train, rows),
            "ray_materialized": feed(cached, rows),
            "ray_materialized_shuffled": feed(cached, rows, shuffle_seed=cfg.seed),
            "ray_streamed_epoch_order": feed(epoch_rows(train, cfg, 1), rows),
            "ray_materialized_epoch_order_shuffled": feed(epoch_rows(cached, cfg, 1), rows, shuffle_seed=cfg.seed),
            "two_ranks_streaming_split": two_ranks(lambda: epoch_rows(cached, cfg, 1).streaming_split(2, equal=True), rows),
            "two_ranks_cut_held": two_ranks(lambda: [epoch_rows(cached, cfg, 1, r, 2) for r in (0, 1)], rows),
            "feed_cpu_side_float32": cpu_side(cached, rows, decode_hidden),
            "feed_cpu_side_stored_dtype": cpu_side(cached, rows, stored_hidden),
        }, passes)
    print(f"data_feed: {manifest['num_tokens']:,} rows x {manifest['hidden_size']} bf16 in {len(manifest['shards'])} "
          f"shards ({train_rows:,} train rows), read in batches of {rows:,}; best of {passes} passes; "
          f"materialize() took {materialize_s:.1f}s")
    print(machine(load))
    print("rows/s: " + " | ".join(f"{name} {rate:,.0f}" for name, rate in rates.items()))
    before, after = rates.pop("feed_cpu_side_float32"), rates.pop("feed_cpu_side_stored_dtype")
    split, cut = rates.pop("two_ranks_streaming_split"), rates.pop("two_ranks_cut_held")
    raw = rates.pop("pyarrow")
    ratios = {f"{k}/pyarrow": print_ratio(f"{k}/pyarrow", v, raw, "rows/s") for k, v in rates.items()}
    d = manifest["hidden_size"]
    print(f"bytes a row sent to the device: {2 * d:,} (bf16, converted there) against {4 * d:,} (float32, converted on the CPU)")
    ratios["feed_cpu_side_stored_dtype/float32"] = print_ratio("feed_cpu_side_stored_dtype/float32", after, before, "rows/s")
    ratios["two_ranks_cut_held/streaming_split"] = print_ratio("two_ranks_cut_held/streaming_split", cut, split,
                                                               "rows/s of an epoch's two shares")
    return ratios


if __name__ == "__main__":
    main()
