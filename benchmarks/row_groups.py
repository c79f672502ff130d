"""Reading one side of the train/validation split: a shard with one row group per document
(what extraction writes) against the same rows in one row group (the earlier layout).

Both go through `trm_ray.shards.side_tables` and `decode_hidden`, the path of training,
validation, the spectrum and the downstream rows. With one row group per document a
validation pass reads only the validation documents' bytes; the earlier layout read every
shard whole and threw ~90% away.

    python -m benchmarks.row_groups      # ~1 min
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import gaussian_rows, machine, print_ratio
from trm_ray.extract import shard_table, write_shard
from trm_ray.hidden import decode_hidden
from trm_ray.shards import side_tables

FULL = {"docs": 64, "length": 512, "d_model": 2048, "passes": 3}
SMOKE = {"docs": 64, "length": 16, "d_model": 64, "passes": 1}


def read_side(path: str, val_side: bool) -> float:
    """Rows per second of one pass over one side of the split (val_fraction 0.1, seed 42)."""
    t0, rows = time.perf_counter(), 0
    for part in side_tables(path, 0.1, 42, val_side, 8192, ["doc_id", "hidden"]):
        rows += decode_hidden(part["hidden"]).shape[0]
    return rows / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.row_groups", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    sizes = SMOKE if parser.parse_args(argv).smoke else FULL
    load = os.getloadavg()[0]
    docs, length = sizes["docs"], sizes["length"]
    hidden = gaussian_rows(torch.Generator().manual_seed(0), docs * length, sizes["d_model"])
    table = shard_table(hidden, np.repeat(np.arange(docs), length), np.tile(np.arange(length), docs),
                        np.zeros(docs * length, np.int32), "bfloat16")
    ratios = {}
    with tempfile.TemporaryDirectory() as work_dir:
        per_doc, one_group = os.path.join(work_dir, "per_doc.parquet"), os.path.join(work_dir, "one_group.parquet")
        write_shard(table, per_doc)
        pq.write_table(table, one_group)
        print(f"row_groups: {docs} documents x {length} tokens x {sizes['d_model']} bf16 in one shard; "
              f"best of {sizes['passes']} passes, taken round robin")
        for side, name in ((True, "validation"), (False, "train")):
            rates = {per_doc: [], one_group: []}
            for _ in range(sizes["passes"]):
                for path in rates:
                    rates[path].append(read_side(path, side))
            best = {path: max(r) for path, r in rates.items()}
            ratios[f"{name}_per_document/one_group"] = print_ratio(
                f"{name}_per_document/one_group", best[per_doc], best[one_group], "rows/s")
    print(machine(load))
    return ratios


if __name__ == "__main__":
    main()
