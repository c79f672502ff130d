"""Shared fixtures: one Ray instance, one tiny model + corpus, one shard set for the whole session."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from trm_ray.config import Config, make_config  # noqa: E402
from trm_ray.quickstart import write_assets  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the suite; 8 logical CPUs so that trials, Ray Data and the Train
    controller do not wait on each other on a 2-core machine."""
    import ray

    from trm_ray.cli import connect

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
