"""What the dashboard and Prometheus show, and what must never show: trm_ray's own metrics, no secrets."""

import dataclasses
import os
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from trm_ray.cluster import forwarded_env
from trm_ray.extract import extract

from helpers import SWEPT_WINDOW, fit, width_metrics


def scrape(ray) -> str:
    """The Prometheus text of every live node's metrics endpoint (what a Prometheus server scrapes)."""
    pages = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            pages.append(urllib.request.urlopen(url, timeout=10).read().decode())
    return "\n".join(pages)


def record(seen: dict, text: str) -> None:
    """Add the trm_ samples of one scrape to `seen`: {(metric, trial or shards tag): [values in scrape order]}."""
    for name, labels, value in re.findall(r"^ray_(trm_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        source = re.search(r'(?:trial|shards)="([^"]*)"', labels)
        seen.setdefault((name, source.group(1)), []).append(float(value))


@pytest.mark.integration
def test_extraction_and_a_running_trial_publish_their_metrics_on_the_prometheus_endpoint(shards, tmp_path, ray_cluster):
    small = dataclasses.replace(shards, shards_dir=str(tmp_path / "shards"), num_samples=40)

    def work():
        manifest = extract(small)
        # A learning rate no other test uses: the trial's name must be this run's alone.
        return manifest, fit(shards, tmp_path, num_workers=1, batch_size=8, num_epochs=6, early_stopping=False,
                             learning_rate=0.0123)

    seen: dict = {}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(work)
        while not running.done():  # Ray drops a gauge that nobody has set for ~20 s: scrape while it runs
            record(seen, scrape(ray_cluster))
            time.sleep(1)
        manifest, result = running.result()
    trial, deadline = "d16-lr0.0123", time.time() + 60
    while 6 not in seen.get(("trm_epoch", trial), []) and time.time() < deadline:  # the last epoch's export
        record(seen, scrape(ray_cluster))
        time.sleep(1)

    assert max(seen[("trm_extract_tokens", small.shards_path)]) == manifest["num_tokens"]
    assert all(v > 0 for v in seen[("trm_extract_tokens_per_s", small.shards_path)])
    assert max(seen[("trm_epoch", trial)]) == 6
    for name, key in (("trm_pca_efficiency", "pca_efficiency"), ("trm_val_cosine_similarity", "cosine_similarity"),
                      ("trm_val_mse", "mse")):
        assert width_metrics(result)[key] in seen[(name, trial)], name  # the last epoch's value, exactly
    assert all(v > 0 for v in seen[("trm_train_tokens_per_s", trial)])


def test_workers_get_the_driver_settings_but_never_a_secret():
    environ = {"WANDB_MODE": "offline", "WANDB_API_KEY": "k", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "t",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root"}
    assert forwarded_env(environ) == {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def files_containing(root: str, secret: bytes) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                if secret in open(path, "rb").read():
                    found.append(path)
            except OSError:  # a socket, or a file removed while we walk
                pass
    return found


@pytest.mark.integration
def test_the_wandb_key_reaches_no_job_record_log_or_result(swept, ray_cluster):
    from ray.util.state import list_jobs

    cfg, _ = swept
    key = os.environ["WANDB_API_KEY"]
    jobs = str(list_jobs(address=ray_cluster.get_runtime_context().gcs_address, detail=True))
    assert "WANDB_MODE" in jobs  # the forwarded settings are there, for anyone with the dashboard to read
    assert key not in jobs
    session_dir = ray_cluster._private.worker._global_node.get_session_dir_path()
    assert files_containing(os.path.join(session_dir, "logs"), key.encode()) == []
    assert files_containing(cfg.output_dir, key.encode()) == []
    assert os.path.exists(os.path.join(cfg.output_dir, "wandb"))  # the offline W&B runs were scanned too


@pytest.mark.integration
def test_a_sweep_that_succeeded_shows_no_failed_task_and_logs_none_of_rays_alarms(swept, ray_cluster):
    """The dashboard's job page counts the failed tasks; the session's log files hold every line Ray printed.

    Ray's TuneReportCallback polled an empty queue every 0.2 s, each poll a failed task (~500 a quickstart
    sweep). What may remain are Ray's own intended exits, whose last call Ray can record as failed: a
    trial's helper (its controller, its queue) exits when the trial ends and the state of its last call
    can be lost on the way out (WORKER_DIED, exit type 1, INTENDED_SYSTEM_EXIT), and Train's
    PlacementGroupCleaner ends its own `stop` call with `exit_actor()` (exit type 3,
    INTENDED_USER_EXIT); none of those raised."""
    from ray.util.state import list_tasks

    cfg, rows = swept
    address = ray_cluster.get_runtime_context().gcs_address
    began, ended = SWEPT_WINDOW["began_ms"], SWEPT_WINDOW["ended_ms"]

    def sweep_tasks(*filters):
        tasks = list_tasks(address=address, filters=list(filters), detail=True, limit=10000, raise_on_missing_output=False)
        return [t for t in tasks if began <= t.creation_time_ms <= ended]

    assert len(sweep_tasks(("func_or_class_name", "=", "TrainController.run"))) == 1  # one trial: one lr, every D'
    failed = sweep_tasks(("state", "=", "FAILED"))
    intended = ("died with exit_type: 1 ", "died with exit_type: 3 ")
    assert [(t.func_or_class_name, t.error_type, t.error_message) for t in failed
            if t.error_type != "WORKER_DIED" or not any(s in t.error_message for s in intended)] == []

    # Ray's C++ log lines open with their time, `[2026-12-01 20:38:01,123 E ...`: only the sweep's own
    # count (the suite's Ray runs other tests' trials and extractions before and after it).
    logs = os.path.join(ray_cluster._private.worker._global_node.get_session_dir_path(), "logs")
    for alarm in (b"has constructor arguments in the object store", b"PYTHON worker processes have been started"):
        during = []
        for path in files_containing(logs, alarm):
            for line in open(path, "rb"):
                stamp = re.match(rb"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
                if alarm in line and stamp:
                    ms = time.mktime(time.strptime(stamp[1].decode(), "%Y-%m-%d %H:%M:%S")) * 1000 + int(stamp[2])
                    during += [line] if began <= ms <= ended else []
        assert during == [], alarm
