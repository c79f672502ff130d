"""Shared fixtures: one Ray instance, one tiny model + corpus, one shard set for the whole session."""

from __future__ import annotations

import dataclasses
import json
import os
import time

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The Train controller's poll (0.5 s in a sweep, `cluster.connect`) paces the start, reports and end of every
# trial; the suite's epochs take a fraction of a second, and a trial ~10 s, 1-3 s of which were this wait.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# A key that must never show up in what Ray stores or shows, or in anything a sweep writes.
os.environ.setdefault("WANDB_API_KEY", "trm-test-key-" + "7" * 27)

import pytest  # noqa: E402

from trm_ray.config import make_config  # noqa: E402
from trm_ray.quickstart import write_assets  # noqa: E402

from helpers import SEED_FLAGS, SWEPT_WINDOW, moved_copy, small_config  # noqa: E402


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


@pytest.fixture(scope="session")
def shards(ray_cluster, assets, tmp_path_factory):
    """A config whose shards are extracted (once per session)."""
    from trm_ray.extract import extract

    cfg = small_config(assets, tmp_path_factory.mktemp("run"))
    extract(cfg)
    return cfg


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


@pytest.fixture
def swept_copy(swept, tmp_path):
    """The `swept` sweep's output in a private copy (its paths pointing into the copy), free to resume,
    extend or publish from: the session's sweep stays as it ran, whatever order the tests run in."""
    cfg, _ = swept
    out = moved_copy(cfg.output_dir, str(tmp_path / "swept"))
    return dataclasses.replace(cfg, output_dir=out), json.loads(open(f"{out}/sweep_results.json").read())


@pytest.fixture(scope="session")
def stage1b(swept, assets, tmp_path_factory):
    """Stage 1b on phase 2's regions of the reasoning corpus, starting from the 1a sweep's checkpoints (in a
    copy of the 1a sweep's output directory, which stays as it ran)."""
    from trm_ray import sweep

    out = moved_copy(swept[0].output_dir, str(tmp_path_factory.mktemp("stage1b") / "out"))
    cfg_1a, rows_1a = dataclasses.replace(swept[0], output_dir=out), json.loads(open(f"{out}/sweep_results.json").read())
    argv = ["--stage", "1b", "--keep_tokens", "phase2", "--model_name", cfg_1a.model_name, "--dataset", assets["reasoning"],
            "--num_samples", "120", "--max_seq_length", "64", "--docs_per_shard", "40", "--output_dir", cfg_1a.output_dir,
            "--sweep", "--sweep_d_values", "8", "16", "--num_epochs", "2", "--batch_size", "4", "--learning_rate", "0.003",
            "--no_torch_compile", "--no_wandb"]
    sweep.main(argv)
    parser = sweep.build_parser("t", "t")
    cfg = sweep.config_from_args(parser.parse_args(argv))
    rows = json.loads(open(f"{cfg_1a.output_dir}/sweep_results_stage1b.json").read())
    return cfg, rows, rows_1a


# --- Unit and integration tests -------------------------------------------------------------------------------
# An integration test starts Ray (the session's `ray_cluster`, or a Ray of its own), a subprocess that starts
# Ray, or a sweep; it is marked `integration`. Every other test is a unit test, and must start no Ray at all.

RAY_FIXTURES = {"ray_cluster", "shards", "swept", "swept_copy", "stage1b"}  # each starts (or needs) the session's Ray


def pytest_collection_modifyitems(config, items):
    """A test that asks for the session's Ray but is not marked `integration` is an error; the unit tests run
    first (stable order otherwise), so that none of them can find a running Ray and use it unnoticed."""
    unmarked = [item.nodeid for item in items
                if item.get_closest_marker("integration") is None and RAY_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("these tests use the session's Ray but are not marked integration:\n  " + "\n  ".join(unmarked))
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)


def ray_sessions(temp_dir: str) -> list[str]:
    root = os.path.join(temp_dir, "ray")
    return sorted(n for n in os.listdir(root) if n.startswith("session_2")) if os.path.isdir(root) else []  # not session_latest


@pytest.fixture(autouse=True)
def _a_unit_test_starts_no_ray(request):
    """Fails a unit test (one not marked `integration`) that started Ray, in this process or in a subprocess.

    In this process: Ray is initialised after the test (it was not before). In a subprocess: RAY_TMPDIR points
    this test's Rays at a directory of its own, where any local Ray it started leaves a session_* folder."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    import shutil
    import sys
    import tempfile

    def initialised() -> bool:
        ray = sys.modules.get("ray")  # never imported: never started
        return ray is not None and ray.is_initialized()

    before = initialised()
    temp_dir = tempfile.mkdtemp(prefix="unit-ray-")  # short: Ray's socket paths must fit in 107 bytes
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        started_here = not before and initialised()
        if started_here:
            sys.modules["ray"].shutdown()
        sessions = ray_sessions(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    if started_here or sessions:
        pytest.fail(f"{request.node.nodeid} is a unit test but started Ray "
                    f"({'in the test process' if started_here else 'in a subprocess: ' + ', '.join(sessions)}): "
                    "mark it @pytest.mark.integration, or keep Ray out of it", pytrace=False)
