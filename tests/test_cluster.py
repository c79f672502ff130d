import copy
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture
def cluster():
    return yaml.safe_load(open("cluster.yaml"))


def test_cluster_yaml_passes_the_ray_autoscaler_schema(cluster):
    validate_config(prepare_config(cluster))


def test_cluster_yaml_keeps_the_dashboard_private_and_has_an_autoscaling_gpu_worker(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    # Token authentication on every node, all with the one token copied from the launching machine.
    for command in (*cluster["head_start_ray_commands"], *cluster["worker_start_ray_commands"]):
        assert "ray stop" in command or command.startswith("RAY_AUTH_MODE=token ray start")
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert any("trm_ray" in c for c in cluster["setup_commands"])


def test_the_schema_check_is_real_a_broken_copy_is_refused(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 1}
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        validate_config(prepare_config(broken))


# Modules Ray's own processes import for trm_ray: every worker process of a job runs the job's setup hook
# (cluster.know_own_cluster), Ray's helper actors included, and every Ray Data read task unpickles a function
# of trm_ray.shards. A second of torch import in each of those processes bought nothing.
@pytest.mark.parametrize("module,light", [("trm_ray.cluster", ("torch", "pyarrow", "transformers")),
                                          ("trm_ray.shards", ("torch", "transformers"))],
                         ids=["setup-hook", "read-tasks"])
def test_what_every_ray_worker_and_read_task_imports_for_trm_ray_leaves_torch_out(module, light):
    done = subprocess.run([sys.executable, "-c", f"import sys, {module}; "
                           f"print(sorted(m for m in {light!r} if m in sys.modules))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs in its own process: a Cluster in the test process would share (and, on shutdown, reset)
# the session's Ray handles. It prints its addresses, then lives until its stdin closes.
CLUSTER_SCRIPT = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
    num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]),
    dashboard_agent_listen_port=int(sys.argv[2]), object_store_memory=300 * 2**20))
cluster.add_node(num_cpus=3, object_store_memory=300 * 2**20)
print(cluster.webui_url, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture
def two_nodes(ray_cluster, monkeypatch):
    """A head and a worker node on this machine (3 logical CPUs each); yields the head's dashboard URL."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the nodes require the token, and clients send it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the session's Ray (cluster.connect sets it): not this cluster's
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, str(free_port()), str(free_port())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield f"http://{proc.stdout.readline().strip()}"
    proc.stdin.close()
    proc.wait(timeout=120)


def submit_when_an_agent_is_up(client, entrypoint, wait_s=120):
    """Submit the job; the nodes' dashboard agents, which run jobs, come up after the head answers (on a
    loaded machine, tens of seconds later), and until then Ray refuses with "No available agent"."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, metadata={"trm_ray": "quickstart sweep"})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.integration
def test_a_sweep_submitted_as_a_ray_job_runs_its_trials_on_several_nodes(two_nodes, shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    out = tmp_path / "out"  # every node of this cluster sees it: shared storage for shards and checkpoints
    entrypoint = (f"python -m trm_ray.sweep --model_name {shards.model_name} --dataset {shards.dataset} "
                  f"--shards_dir {shards.shards_path} --num_samples 120 --max_seq_length 64 --docs_per_shard 20 "
                  f"--output_dir {out} --sweep --sweep_d_values 8 16 32 --num_epochs 1 --batch_size 4 "
                  "--sweep_learning_rates 0.05 0.02 --no_wandb --no_torch_compile --no_downstream --address auto")
    # Two trials (a learning rate each, every D' in each, 2 CPUs each) and a CPU for Ray Data's reads: the sweep
    # runs both at once (5 of the 6 CPUs), which takes both nodes.
    url = two_nodes
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError, match="401"):  # token authentication is on
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    client = JobSubmissionClient(url)
    job = submit_when_an_agent_is_up(client, entrypoint)
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in 10 minutes"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "summary:" in logs and "2 trials at once" in logs

    rows = json.loads((out / "sweep_results.json").read_text())
    assert [r["d_compressed"] for r in rows] == [8, 16, 32]
    assert all((out / f"d{d}" / "stage1a_best.pt").exists() for d in (8, 16, 32))
    workers = list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    assert len({w.node_id for w in workers}) >= 2, "every trial ran on the same node"


@pytest.mark.integration
def test_what_an_autoscaler_may_add_is_read_from_the_configuration_it_reports_to_the_cluster(ray_cluster):
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY, GCS_AUTOSCALER_STATE_NAMESPACE as NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from trm_ray.cluster import most_resources

    assert most_resources() is None  # a local Ray: no autoscaler, nothing it may add
    # What an autoscaler of cluster.yaml's shape reports: a head of 8 CPUs, up to two 8-GPU workers.
    config = ClusterConfig(node_group_configs=[
        NodeGroupConfig(name="head", resources={"CPU": 8}, min_count=1, max_count=1),
        NodeGroupConfig(name="gpu_worker", resources={"CPU": 32, "GPU": 8}, min_count=0, max_count=2)])
    _internal_kv_put(KEY, config.SerializeToString(), namespace=NAMESPACE)
    try:
        assert most_resources() == {"CPU": 72, "GPU": 16}
    finally:
        _internal_kv_del(KEY, namespace=NAMESPACE)
    assert most_resources() is None
