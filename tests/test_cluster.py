import copy

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
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert any("trm_ray" in c for c in cluster["setup_commands"])


def test_the_schema_check_is_real_a_broken_copy_is_refused(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 1}
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        validate_config(prepare_config(broken))
