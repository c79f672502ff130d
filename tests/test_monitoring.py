"""What the dashboard and Prometheus show, and what must never show: trm_ray's own metrics, no secrets."""

import dataclasses
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from trm_ray.extract import extract

from test_train import fit


def scrape(ray) -> str:
    """The Prometheus text of every live node's metrics endpoint (what a Prometheus server scrapes)."""
    pages = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            pages.append(urllib.request.urlopen(url, timeout=10).read().decode())
    return "\n".join(pages)


def record(seen: dict, text: str) -> None:
    """Add the trm_ samples of one scrape to `seen`: {(metric, trial tag): [values in scrape order]}."""
    for name, labels, value in re.findall(r"^ray_(trm_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        trial = re.search(r'trial="([^"]*)"', labels)
        seen.setdefault((name, trial.group(1) if trial else None), []).append(float(value))


def test_extraction_and_a_running_trial_publish_their_metrics_on_the_prometheus_endpoint(shards, tmp_path, ray_cluster):
    small = dataclasses.replace(shards, shards_dir=str(tmp_path / "shards"), num_samples=40)

    def work():
        manifest = extract(small)
        return manifest, fit(shards, tmp_path, num_workers=1, batch_size=8, num_epochs=6, early_stopping=False)

    seen: dict = {}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(work)
        while not running.done():  # Ray drops a gauge that nobody has set for ~20 s: scrape while it runs
            record(seen, scrape(ray_cluster))
            time.sleep(1)
        manifest, result = running.result()
    trial, deadline = "d16-lr0.02", time.time() + 60
    while 6 not in seen.get(("trm_epoch", trial), []) and time.time() < deadline:  # the last epoch's export
        record(seen, scrape(ray_cluster))
        time.sleep(1)

    assert max(seen[("trm_extract_tokens", None)]) == manifest["num_tokens"]
    assert all(v > 0 for v in seen[("trm_extract_tokens_per_s", None)])
    assert max(seen[("trm_epoch", trial)]) == 6
    for name, key in (("trm_pca_efficiency", "pca_efficiency"), ("trm_val_cosine_similarity", "cosine_similarity"),
                      ("trm_val_mse", "mse")):
        assert result.metrics[key] in seen[(name, trial)], name  # the last epoch's value, exactly
    assert all(v > 0 for v in seen[("trm_train_tokens_per_s", trial)])
