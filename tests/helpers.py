"""Builders the test modules share (no test module imports another; they all import this one)."""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil

from trm_ray.config import Config, make_config
from trm_ray.shards import read_manifest, split_counts
from trm_ray.sweep import datasets, limits, trial_spec
from trm_ray.train import make_trainer


def small_config(assets: dict[str, str], out_dir, **overrides) -> Config:
    """The quickstart, shrunk: 120 documents, 3 D', few epochs."""
    values = dict(
        model_name=assets["model"], dataset=assets["corpus"], num_samples=120, max_seq_length=64,
        docs_per_shard=20, output_dir=str(out_dir), sweep=True, sweep_d_values=[8, 16, 32], batch_size=4,
        num_epochs=3, learning_rate=0.01, grace_period=3, num_cpus=8,
    )
    values.update(overrides)
    return make_config(values)


SEED_FLAGS = ["--stage", "1a", "--batch_size", "4", "--num_epochs", "3", "--learning_rate", "0.01",
              "--num_samples", "120", "--max_seq_length", "64", "--seed", "42", "--early_stopping",
              "--early_stopping_patience", "5", "--no_torch_compile", "--use_wandb", "--wandb_project", "trm-test",
              "--wandb_run_name", "qs", "--sweep", "--sweep_d_values", "8", "16", "32", "--num_workers", "1",
              "--no_use_gpu", "--address", "auto"]


# When the `swept` sweep ran (tests that read what it logged, e.g. Ray's task events, look in this window).
SWEPT_WINDOW: dict[str, float] = {}


def fit(cfg, tmp_path, num_workers, batch_size, group="", **overrides):
    """One TorchTrainer run (no Tune) on the session's shards, of the sweep `group`; returns its Result."""
    manifest = read_manifest(cfg.shards_path)
    counts = split_counts(manifest, cfg.val_fraction, cfg.seed)
    cfg = dataclasses.replace(cfg, **{"num_workers": num_workers, "batch_size": batch_size, "d_compressed": 16,
                                      "sweep": False, "num_epochs": 4, "learning_rate": 0.02, "use_wandb": False,
                                      "torch_compile": False, **overrides})
    limit = limits(cfg)
    config = trial_spec(cfg, manifest, counts, limit, str(tmp_path / f"w{num_workers}"), group).flat()
    train, val = datasets(cfg, manifest)
    return make_trainer(config, train, val).fit()


def width_metrics(result, d=16):
    """A trial's last report as one D' sees it: its own metrics (d16/mse as mse) and the trial's shared ones."""
    return {k.removeprefix(f"d{d}/"): v for k, v in result.metrics.items() if "/" not in k or k.startswith(f"d{d}/")}


def wandb_records(path):
    """Records of an offline W&B run file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, chunk, pos = open(path, "rb").read(), [], b"", 7  # 7-byte file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:
            pos += block_left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def moved_copy(src: str, dst: str) -> str:
    """A copy of a sweep's output directory, the absolute paths in its JSON and CSV files (the sweep's
    settings, the reports' checkpoint paths) pointing into the copy. Tests that resume, extend or publish
    from a session fixture's sweep work on one of these, so that the fixture stays as it ran."""
    shutil.copytree(src, dst)
    for path in glob.glob(f"{dst}/**/*", recursive=True):
        if path.endswith((".json", ".csv")) and not os.path.basename(path).startswith("basic-variant-state"):  # a pickle
            text = open(path).read()
            if src in text:
                open(path, "w").write(text.replace(src, dst))
    return dst
