"""Bad inputs and interruptions: each refused with a one-line error that says what to fix, nothing lost."""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest
import torch

from trm_ray import extract as extract_mod
from trm_ray import sweep
from trm_ray.compressor import read_checkpoint
from trm_ray.config import UserError, load_yaml
from trm_ray.hidden import decode_hidden

from helpers import fit, moved_copy


@pytest.fixture
def shard_copy(shards, tmp_path):
    """A private copy of the session's shards, free to damage."""
    path = tmp_path / "shards"
    shutil.copytree(shards.shards_path, path)
    return dataclasses.replace(shards, shards_dir=str(path), output_dir=str(tmp_path / "out"))


@pytest.mark.integration
def test_a_truncated_shard_is_refused_naming_the_file(shard_copy):
    victim = os.path.join(shard_copy.shards_dir, "shard-00002.parquet")
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="shard-00002.parquet is missing, corrupt or truncated"):
        sweep.shards(shard_copy)


@pytest.mark.integration
def test_shards_of_mixed_hidden_sizes_are_refused(shard_copy):
    victim = os.path.join(shard_copy.shards_dir, "shard-00001.parquet")
    table = pq.read_table(victim)
    narrow = extract_mod.shard_table(
        decode_hidden(table["hidden"])[:, :32], table["doc_id"].to_numpy(), table["position"].to_numpy(),
        table["token_id"].to_numpy(), "float32")
    pq.write_table(narrow, victim)
    with pytest.raises(UserError, match="shard-00001.parquet has hidden size 32, the manifest says 64"):
        sweep.shards(shard_copy)


@pytest.mark.integration
def test_a_missing_shard_directory_is_refused(shards, tmp_path):
    from trm_ray.shards import read_manifest

    with pytest.raises(UserError, match="does not exist: run python -m trm_ray.extract first"):
        read_manifest(str(tmp_path / "nowhere"))


@pytest.mark.integration
def test_extraction_refuses_a_disk_too_small_for_its_shards(shards, tmp_path, monkeypatch, capsys):
    Usage = type(shutil.disk_usage("/"))
    monkeypatch.setattr(extract_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    cfg = dataclasses.replace(shards, shards_dir=str(tmp_path / "s"))
    with pytest.raises(UserError, match="may take 0.00 GiB but .* has 0.00 GiB free.*--skip_disk_check"):
        extract_mod.extract(cfg)
    assert not os.path.exists(tmp_path / "s" / "manifest.json")
    extract_mod.check_disk(dataclasses.replace(cfg, skip_disk_check=True), cfg.shards_dir, 10**6)
    assert "shards will take at most" in capsys.readouterr().out


def extract_in_time(cfg):
    """extract(cfg), failing the test after 5 minutes instead of waiting on Ray forever."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(extract_mod.extract, cfg).result(timeout=300)
    finally:
        pool.shutdown(wait=False)


@pytest.mark.integration
def test_extraction_asks_for_the_cpus_that_are_free_and_fails_in_bounded_time_naming_what_holds_them(
        shards, tmp_path, ray_cluster, monkeypatch):
    from ray.util.placement_group import placement_group, remove_placement_group

    # What a killed trial or another job leaves: a placement group holding CPUs of the local Ray.
    group = placement_group([{"CPU": 1}] * 8, name="left-behind")
    assert group.wait(60)
    monkeypatch.setattr(extract_mod, "RESOURCE_WAIT_S", 2.0)
    try:
        began = time.time()
        with pytest.raises(UserError, match=r"1 extraction replica\(s\) of 1 CPU\(s\) waited 2 s for resources that "
                                            r"never came: 0 of 8 CPU free; 1 placement group\(s\) hold 8 CPU \(left-behind\)"):
            extract_in_time(dataclasses.replace(shards, shards_dir=str(tmp_path / "all_held")))
        assert time.time() - began < 60
    finally:
        remove_placement_group(group)
    group = placement_group([{"CPU": 1}] * 6, name="left-behind")  # 2 of 8 CPUs free: the replica takes them
    assert group.wait(60)
    try:
        manifest = extract_in_time(dataclasses.replace(shards, shards_dir=str(tmp_path / "two_free")))
    finally:
        remove_placement_group(group)
    assert manifest["num_docs"] == shards.num_samples


@pytest.mark.integration
def test_an_extraction_replica_that_keeps_dying_fails_extraction_saying_so(shards, tmp_path, ray_cluster, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from ray.util.state import list_actors

    monkeypatch.setattr(extract_mod, "REPLICA_RESTARTS", 1)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(extract_mod.extract, dataclasses.replace(shards, shards_dir=str(tmp_path / "s")))
        killed, deadline = set(), time.time() + 120
        while len(killed) < 2 and not running.done():  # what a kill for memory does on every retry
            assert time.time() < deadline, "the replica never started"
            for actor in list_actors(address=ray_cluster.get_runtime_context().gcs_address,
                                     filters=[("class_name", "=", "HiddenStateExtractor")]):
                if actor.pid and actor.pid not in killed and actor.state != "DEAD":
                    os.kill(actor.pid, signal.SIGKILL)
                    killed.add(actor.pid)
            time.sleep(0.05)
        with pytest.raises(UserError, match="an extraction replica died 2 times .*lower --extract_tokens_per_batch"):
            running.result(timeout=120)


@pytest.mark.integration
def test_an_interrupted_extraction_resumes_without_redoing_finished_shards(shards, tmp_path, monkeypatch):
    cfg = dataclasses.replace(shards, shards_dir=str(tmp_path / "s"))
    os.makedirs(cfg.shards_dir)
    for name in ("extraction.json", "shard-00000.parquet", "shard-00003.parquet"):  # what a crash left behind
        shutil.copy(os.path.join(shards.shards_path, name), cfg.shards_dir)
    open(os.path.join(cfg.shards_dir, ".shard-00001.parquet.tmp"), "wb").write(b"half a shard")
    done_before = {n: os.path.getmtime(os.path.join(cfg.shards_dir, n)) for n in ("shard-00000.parquet", "shard-00003.parquet")}
    manifest = extract_mod.extract(cfg)
    assert manifest == json.load(open(os.path.join(shards.shards_path, "manifest.json"))) | {"model": manifest["model"]}
    for name, mtime in done_before.items():
        assert os.path.getmtime(os.path.join(cfg.shards_dir, name)) == mtime  # not rewritten


def test_invalid_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("d_compressed: [128\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_yaml(path)


def trained_files(out: str) -> dict[str, float]:
    """What training writes (Train's checkpoints and run state, W&B runs), with modification times."""
    paths = glob.glob(f"{out}/ray_results/*_train/**", recursive=True) + glob.glob(f"{out}/wandb/**", recursive=True)
    return {path: os.path.getmtime(path) for path in paths if os.path.isfile(path)}


@pytest.mark.integration
def test_the_same_sweep_command_again_resumes_and_reruns_nothing(swept, tmp_path, capsys):
    cfg, rows = swept
    out = moved_copy(cfg.output_dir, str(tmp_path / "out"))  # the session's sweep stays as it ran
    before = trained_files(out)
    assert any(path.endswith("compressor.pt") for path in before) and glob.glob(f"{out}/wandb/offline-run-*")
    again = sweep.run(sweep.resumed_config(out))  # what `--resume <output_dir>` runs
    assert f"sweep: resuming {out}/ray_results/stage1a_sweep" in capsys.readouterr().out
    assert trained_files(out) == before  # no epoch ran: no checkpoint and no W&B run was written
    assert [r["mse"] for r in again] == [r["mse"] for r in rows]
    assert [r["checkpoint"] for r in again] == [os.path.join(out, f"d{d}", "stage1a_best.pt") for d in (8, 16, 32)]


@pytest.mark.integration
def test_a_different_sweep_into_the_same_output_dir_is_refused(swept_copy):
    cfg, _ = swept_copy  # were it not refused, it would overwrite the session's sweep
    with pytest.raises(UserError, match="holds another sweep's results .*learning_rate.* --overwrite"):
        sweep.run(dataclasses.replace(sweep.resumed_config(cfg.output_dir), learning_rate=0.2))


def registered_epoch(root) -> int:
    """Epoch of the newest checkpoint Train has registered under `root` (0 while none): the one a
    replaced worker is handed and a restored sweep continues from."""
    epochs = [0]
    for path in glob.glob(f"{root}/**/checkpoint_manager_snapshot.json", recursive=True):
        try:
            latest = json.loads(open(path).read())["latest_checkpoint_result"]
        except (OSError, json.JSONDecodeError, KeyError):  # being rewritten
            continue
        if latest:
            epochs.append(latest["metrics"]["epoch"])
    return max(epochs)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: Adam's moments must follow the model onto it on resume")


@pytest.mark.integration
@pytest.mark.parametrize("objective,use_gpu,num_workers",
                         [("kl", False, 2), pytest.param("mse", True, 1, marks=GPU)], ids=["kl-ddp", "mse-gpu"])
def test_a_sweep_that_lost_a_training_worker_and_then_its_driver_resumes_to_the_results_of_one_never_interrupted(
        shards, tmp_path, ray_cluster, objective, use_gpu, num_workers):
    from ray.util.state import list_actors

    out = tmp_path / "out"
    # An orthogonal start: weights that move every epoch, so a trial restarted from scratch would end elsewhere.
    argv = [sys.executable, "-m", "trm_ray.sweep", "--model_name", shards.model_name, "--dataset", shards.dataset,
            "--shards_dir", shards.shards_path, "--num_samples", "120", "--max_seq_length", "64", "--docs_per_shard", "20",
            "--output_dir", str(out), "--sweep", "--sweep_d_values", "8", "16", "--num_epochs", "4", "--batch_size", "8",
            "--learning_rate", "0.01", "--init", "orthogonal", "--no_early_stopping", "--objective", objective,
            "--num_workers", str(num_workers), "--use_gpu" if use_gpu else "--no_use_gpu", "--no_wandb",
            "--no_torch_compile", "--no_downstream", "--address", ray_cluster.get_runtime_context().gcs_address]
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while registered_epoch(out / "ray_results") < 2:
            assert time.time() < deadline and driver.poll() is None, "the trial never registered a second checkpoint"
            time.sleep(0.05)
        workers = list_actors(address=ray_cluster.get_runtime_context().gcs_address,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == num_workers
        os.kill(workers[-1].pid, signal.SIGKILL)  # with DDP, one rank: the whole group restarts from the checkpoint
        # The replaced group continues from a checkpoint (not from scratch) and says so; then the driver dies.
        while not re.search(r"lr0\.01: resuming after epoch [2-9]", log.read_text()):
            assert time.time() < deadline and driver.poll() is None, "the replaced workers never resumed"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        driver.kill()
    assert not (out / "sweep_results.json").exists() and not glob.glob(f"{out}/wandb/offline-run-*")

    # Resumed with W&B on (`--resume OUT --use_wandb`): the restored trial logs the rest of its epochs.
    resumed = sweep.run(dataclasses.replace(sweep.resumed_config(str(out)), use_wandb=True))
    clean = sweep.run(dataclasses.replace(sweep.resumed_config(str(out)), output_dir=str(tmp_path / "clean")))
    assert [r["d_compressed"] for r in resumed] == [r["d_compressed"] for r in clean] == [8, 16]
    assert sorted(path.rsplit("-", 1)[-1] for path in glob.glob(f"{out}/wandb/offline-run-*")) == ["d16", "d8"]
    for r, c in zip(resumed, clean):
        assert r["epochs_trained"] == c["epochs_trained"] == 4
        for key in ("mse", "cosine_similarity", *(("downstream_kl",) if objective == "kl" else ())):
            assert r[key] == pytest.approx(c[key], rel=1e-4), key


@pytest.mark.integration
def test_a_worker_replaced_while_asha_decides_trains_no_epoch_of_the_width_asha_stopped(shards, tmp_path, ray_cluster):
    from concurrent.futures import ThreadPoolExecutor

    from ray.util.state import list_actors

    from trm_ray.names import cuts_name
    from trm_ray.scheduler import WidthCuts

    group = f"cut-{uuid.uuid4().hex[:8]}"
    cuts = ray_cluster.remote(WidthCuts).options(name=cuts_name(group), num_cpus=0).remote({})  # the sweep's, undecided
    # An orthogonal start: a second epoch would improve d8, and become its best.
    settings = dict(sweep=True, sweep_d_values=[8, 16], num_epochs=2, early_stopping=False, init="orthogonal")
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(fit, shards, tmp_path, 1, 4, group=group, **settings)
            deadline = time.time() + 300
            while registered_epoch(tmp_path) < 1:  # then the trial waits for ASHA's decision on its first report
                assert time.time() < deadline and not running.done(), "the trial never registered a checkpoint"
                time.sleep(0.05)
            (worker,) = list_actors(address=ray_cluster.get_runtime_context().gcs_address,
                                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            os.kill(worker.pid, signal.SIGKILL)
            ray_cluster.get(cuts.add.remote("lr0.02", 8))  # ASHA's decision, after the checkpoint was written: stop d8
            ray_cluster.get(cuts.decided.remote("lr0.02", 10 ** 12))
            killed = running.result(timeout=600)
    finally:
        ray_cluster.kill(cuts)
    assert killed.error is None and killed.metrics["resumed_after_epoch"] == 1
    assert killed.metrics["d_values_training"] == 1 and "d8/mse" not in killed.metrics
    best = read_checkpoint(f"{killed.checkpoint.path}/d8/compressor.pt")
    assert best["best_metrics"]["epoch"] == 1  # its exported best is from before ASHA's cut


@pytest.mark.parametrize("flags,expected", [
    (["--dataset", "./corpus.jsonll"], "error: dataset ./corpus.jsonll does not exist"),
    (["--output_dir", "/proc/x"], "error: --output_dir /proc/x is not writable"),
    (["--output_dir", "/proc/x", "--skip_disk_check"], "error: --output_dir /proc/x is not writable"),
], ids=["dataset", "output_dir", "output_dir-skip_disk_check"])
def test_a_mistyped_path_is_refused_before_ray_starts(assets, tmp_path, flags, expected):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "trm_ray.sweep", "--model_name", assets["model"], "--dataset", assets["corpus"],
            "--output_dir", str(tmp_path / "out"), "--d_compressed", "8", "--no_wandb", *flags]
    began = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert done.stderr.startswith(expected)
    assert "Ray" not in done.stdout + done.stderr  # no local Ray was started for it
    assert time.time() - began < 60


def test_ray_failing_to_start_is_a_one_line_error_naming_the_likely_cause(monkeypatch):
    import ray

    from trm_ray.cluster import start_ray

    def times_out(**kwargs):  # what Ray raises when its raylet does not come up in 30 s on a loaded machine
        raise Exception("The current node timed out during startup. This could happen because some of the Ray "
                        "processes failed to startup.\nmore details")

    monkeypatch.setattr(ray, "init", times_out)
    with pytest.raises(UserError, match=r"^the local Ray did not start in time: the machine is probably loaded.*"
                                        r"\(Exception: The current node timed out during startup\. .*\)$"):
        start_ray(num_cpus=2)
    with pytest.raises(UserError, match="the Ray cluster at 10.0.0.1:6379 did not answer"):
        start_ray(address="10.0.0.1:6379")
