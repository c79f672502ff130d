"""Shared fixtures: one Ray instance, one tiny model + corpus, one shard set for the whole session."""

from __future__ import annotations

import dataclasses
import json
import os
import time

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# A key that must never show up in what Ray stores or shows, or in anything a sweep writes.
os.environ.setdefault("WANDB_API_KEY", "trm-test-key-" + "7" * 27)

import pytest  # noqa: E402

from trm_ray.config import Config, make_config  # noqa: E402
from trm_ray.quickstart import write_assets  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the suite; 8 logical CPUs so that trials, Ray Data and the Train
    controller do not wait on each other on a 2-core machine."""
    import ray

    from trm_ray.cluster import connect

    connect(make_config({"num_cpus": 8}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    return write_assets(tmp_path_factory.mktemp("assets"), num_docs=120)


def small_config(assets: dict[str, str], out_dir, **overrides) -> Config:
    """The quickstart, shrunk: 120 documents, 3 D', few epochs."""
    values = dict(
        model_name=assets["model"], dataset=assets["corpus"], num_samples=120, max_seq_length=64,
        docs_per_shard=20, output_dir=str(out_dir), sweep=True, sweep_d_values=[8, 16, 32], batch_size=4,
        num_epochs=3, learning_rate=0.01, grace_period=3, num_cpus=8,
    )
    values.update(overrides)
    return make_config(values)


@pytest.fixture(scope="session")
def shards(ray_cluster, assets, tmp_path_factory) -> Config:
    """A config whose shards are extracted (once per session)."""
    from trm_ray.extract import extract

    cfg = small_config(assets, tmp_path_factory.mktemp("run"))
    extract(cfg)
    return cfg


SEED_FLAGS = ["--stage", "1a", "--batch_size", "4", "--num_epochs", "3", "--learning_rate", "0.01",
              "--num_samples", "120", "--max_seq_length", "64", "--seed", "42", "--early_stopping",
              "--early_stopping_patience", "5", "--no_torch_compile", "--use_wandb", "--wandb_project", "trm-test",
              "--wandb_run_name", "qs", "--sweep", "--sweep_d_values", "8", "16", "32", "--num_workers", "1",
              "--no_use_gpu", "--address", "auto"]


# When the `swept` sweep ran (tests that read what it logged, e.g. Ray's task events, look in this window).
SWEPT_WINDOW: dict[str, float] = {}


@pytest.fixture(scope="session")
def swept(shards, tmp_path_factory):
    """The quickstart flow end to end through the CLI (3 D', ASHA, export), on the session's shards."""
    out = tmp_path_factory.mktemp("sweep")
    yaml_file = out / "run.yaml"
    yaml_file.write_text(f"model_name: {shards.model_name}\nshards_dir: {shards.shards_path}\n"
                         f"dataset: {shards.dataset}\ndocs_per_shard: 20\ngrace_period: 3\nlearning_rate: 0.5\n")
    from trm_ray import sweep

    SWEPT_WINDOW["began_ms"] = time.time() * 1000
    sweep.main(["--config", str(yaml_file), "--output_dir", str(out), *SEED_FLAGS])
    SWEPT_WINDOW["ended_ms"] = time.time() * 1000
    cfg = dataclasses.replace(shards, output_dir=str(out), shards_dir=shards.shards_path)
    return cfg, json.loads((out / "sweep_results.json").read_text())


@pytest.fixture(scope="session")
def stage1b(swept, assets):
    """Stage 1b on phase 2's regions of the reasoning corpus, starting from the 1a sweep's checkpoints."""
    from trm_ray import sweep

    cfg_1a, rows_1a = swept
    argv = ["--stage", "1b", "--keep_tokens", "phase2", "--model_name", cfg_1a.model_name, "--dataset", assets["reasoning"],
            "--num_samples", "120", "--max_seq_length", "64", "--docs_per_shard", "40", "--output_dir", cfg_1a.output_dir,
            "--sweep", "--sweep_d_values", "8", "16", "--num_epochs", "2", "--batch_size", "4", "--learning_rate", "0.003",
            "--no_torch_compile", "--no_wandb"]
    sweep.main(argv)
    parser = sweep.build_parser("t", "t")
    cfg = sweep.config_from_args(parser.parse_args(argv))
    rows = json.loads(open(f"{cfg_1a.output_dir}/sweep_results_stage1b.json").read())
    return cfg, rows, rows_1a
