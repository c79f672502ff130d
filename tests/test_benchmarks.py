"""Every benchmark's --smoke mode runs end to end and prints its ratio lines.

These check the scripts, not the speed: no timing thresholds, only that each ratio line is
there and holds a finite positive number. Those on Ray run in-process on the session's Ray (a
second local Ray beside it would make Ray's own actors ask which cluster to join).
"""

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed

from benchmarks import (data_feed, extract, kl_grid_step, kl_objective, quality, row_groups, step_cost, sweep_cost,  # noqa: E402
                        train_loop, validation_split)

# Not anchored at a line start: Ray's log forwarding may write into the same stdout without a newline.
RATIO_LINE = re.compile(r"ratio (\S+): (\S+)x \(")


ON_RAY = [train_loop, data_feed, sweep_cost, quality, extract, kl_objective]  # integration: they run on the session's Ray
RAY_FREE = [row_groups, step_cost, kl_grid_step, validation_split]  # unit: plain torch, pyarrow and gloo, no Ray


@pytest.mark.parametrize("bench", [*(pytest.param(b, marks=pytest.mark.integration) for b in ON_RAY), *RAY_FREE],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_smoke_mode_prints_a_finite_positive_ratio_for_each_figure(bench, request, capsys):
    if request.node.get_closest_marker("integration"):
        request.getfixturevalue("ray_cluster")
    returned = bench.main(["--smoke"])
    out = capsys.readouterr().out
    printed = dict(RATIO_LINE.findall(out))
    assert returned and printed.keys() == returned.keys(), out[-3000:]
    for name, value in printed.items():
        assert math.isfinite(float(value)) and float(value) > 0, f"{name}: {value}"


@pytest.mark.integration
def test_gpu_run_tiny_runs_extraction_spectrum_sweep_and_downstream_kl_and_prints_rates(ray_cluster, capsys, tmp_path):
    from benchmarks import gpu_run

    figures = gpu_run.main(["--tiny", "--work_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert figures["extract_tokens_per_s"] > 0 and "extraction:" in out and "GFLOP/token" in out, out[-3000:]
    trained = [v for k, v in figures.items() if k.startswith("train_tokens_per_s/")]
    assert len(trained) == 1 and trained[0] > 0, figures  # one trial: one learning rate trains both D'
    assert [k for k in figures if k.startswith("validation_s/")] and figures["pca_kl_pass_s"] > 0, figures
    kl = [v for k, v in figures.items() if k.startswith("downstream_kl/")]
    assert len(kl) == 2 and all(math.isfinite(v) and v > 0 for v in kl), figures


def test_sweep_cost_scale_counts_a_node_busy_once_validation_and_passes_are_split(capsys):
    from benchmarks import sweep_cost

    sweep_cost.main(["--scale", "--config", "tune_configs/smollm3_stage1b.yaml", "--model_type", "smollm3",
                     "--sweep_learning_rates", "0.001", "--num_workers", "8"])
    out = capsys.readouterr().out
    phase = re.compile(r"^  (reference \+ scoring passes|training \(epochs, validation\)) +(\d+) +\S+ +\S+ +(\d+)%$", re.M)
    before, now = (dict((name, (int(gpus), int(busy))) for name, gpus, busy in phase.findall(part))
                   for part in out.split("before: validation, passes on one GPU")[1].split("now: split over workers and GPUs"))
    # One trial on all 8 GPUs: rank 0's validation kept the other seven waiting; split, every GPU works.
    assert before["reference + scoring passes"] == (1, 12) and now["reference + scoring passes"] == (8, 100)
    assert before["training (epochs, validation)"][1] < 100 and now["training (epochs, validation)"] == (8, 100)
