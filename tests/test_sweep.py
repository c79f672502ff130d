import glob
import json
import os

import pytest
import torch
import transformers

from trm_ray import sweep
from trm_ray.compressor import DimensionCompressor, read_checkpoint
from trm_ray.config import UserError, load_yaml, make_config
from trm_ray.downstream import pca_kl
from trm_ray.kl import next_token_damage
from trm_ray.hidden import validation_rows
from trm_ray.model import load_lm_head
from trm_ray.train import load_splits
from trm_ray.references import training_mean
from trm_ray.loop import evaluate
from trm_ray.train import hidden_batches

from helpers import wandb_records


@pytest.mark.integration
def test_every_seed_flag_reaches_the_trainer(swept):
    cfg, rows = swept
    trained_with = read_checkpoint(rows[0]["checkpoint"])["config"].to_dict()  # the settings the workers got
    expected = {"stage": "1a", "batch_size": 4, "num_epochs": 3, "learning_rate": 0.01, "num_samples": 120,
                "max_seq_length": 64, "seed": 42, "early_stopping": True, "early_stopping_patience": 5,
                "torch_compile": False, "use_wandb": True, "wandb_project": "trm-test", "wandb_run_name": "qs",
                "sweep": True, "sweep_d_values": [8, 16, 32], "num_workers": 1, "use_gpu": False, "address": "auto",
                "output_dir": cfg.output_dir, "d_compressed": 8, "grace_period": 3, "docs_per_shard": 20}
    assert {k: trained_with[k] for k in expected} == expected  # learning_rate: the flag beat the YAML's 0.5


@pytest.mark.integration
def test_sweep_exports_one_checkpoint_per_d_prime_in_the_seed_layout(swept):
    cfg, rows = swept
    assert [r["d_compressed"] for r in rows] == [8, 16, 32]
    for r in rows:
        assert r["checkpoint"] == os.path.join(cfg.output_dir, f"d{r['d_compressed']}", "stage1a_best.pt")
        assert r["compression_ratio"] == 64 / r["d_compressed"]
        assert r["num_params"] == 64 * r["d_compressed"]
    saved = json.loads(open(os.path.join(cfg.output_dir, "sweep_results.json")).read())
    assert saved == rows
    # A larger D' reconstructs better.
    cos = [r["cosine_similarity"] for r in rows]
    assert cos == sorted(cos) and cos[-1] > 0.98


@pytest.mark.integration
def test_exported_checkpoints_load_safely_and_reproduce_the_reported_validation_cosine(swept):
    cfg, rows = swept
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    for r in rows:
        ckpt = read_checkpoint(r["checkpoint"])
        assert set(ckpt) == {"compressor", "config", "best_loss", "best_metrics"}
        assert ckpt["config"].d_compressed == r["d_compressed"] and ckpt["config"].hidden_size == 64
        assert ckpt["best_loss"] == pytest.approx(r["mse"])
        model = DimensionCompressor.from_checkpoint(r["checkpoint"]).eval()
        metrics = evaluate([model], hidden_batches(val, 1024, torch.device("cpu")),
                           training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed))[0]
        assert metrics["cosine_similarity"] == pytest.approx(r["cosine_similarity"], abs=1e-4)
        assert metrics["mse"] == pytest.approx(r["mse"], rel=1e-4)
        for k in ("centred_cosine_similarity", "centred_explained_variance"):
            assert metrics[k] == pytest.approx(r[k], abs=1e-4)


@pytest.mark.integration
def test_an_mse_sweep_from_pca_exports_the_closed_form_with_the_metrics_its_weights_measure(shards, tmp_path):
    # The defaults of stage 1a (no --num_epochs): PCA is the optimum, so no trial runs and no epoch is spent.
    cfg = make_config({**{k: getattr(shards, k) for k in ("model_name", "dataset", "num_samples", "max_seq_length",
                                                          "docs_per_shard", "sweep", "sweep_d_values", "num_cpus")},
                       "shards_dir": shards.shards_path, "output_dir": str(tmp_path), "use_wandb": False})
    assert cfg.closed_form and cfg.num_epochs == 10
    rows = sweep.run(cfg)
    assert not os.path.exists(tmp_path / "ray_results")  # no Tune experiment: nothing was trained
    val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)[1]
    mean = training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed)
    lm_head = load_lm_head(cfg.model_name, torch.device("cpu"))
    hidden, targets = validation_rows(cfg.shards_path, cfg.val_fraction, cfg.seed)
    pca_reference = pca_kl(False, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, cfg.d_values)
    for r in rows:
        assert (r["obtained_by"], r["epochs_trained"], r["pca_efficiency"]) == ("closed_form", 0, 1.0)
        model = DimensionCompressor.from_checkpoint(r["checkpoint"]).eval()
        measured = evaluate([model], hidden_batches(val, 1024, torch.device("cpu")), mean)[0]
        saved = read_checkpoint(r["checkpoint"])["best_metrics"]
        for k, v in measured.items():  # computed here from the exported weights, there from the spectrum's sums
            assert r[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
            assert saved[k] == r[k]
        assert r["orthonormality_error"] < 1e-6
        # The exported file's own KL, and PCA's from the spectrum's eigenvectors (`grid_kl`'s path, not the row's).
        # Float32 logits: the row's tasks (one thread each) and this process sum them in other orders (1.1e-5 seen).
        assert r["downstream_kl"] == pytest.approx(next_token_damage(lm_head, hidden, targets, model)["kl"], rel=1e-4)
        assert r["pca_downstream_kl"] == pytest.approx(pca_reference[str(r["d_compressed"])], rel=1e-4)


@pytest.mark.integration
def test_a_sweep_over_a_model_without_an_lm_head_exports_every_d_prime_says_so_once_and_succeeds(assets, ray_cluster,
                                                                                                  tmp_path, capsys):
    model = tmp_path / "tiny-bert"  # a sentence encoder: BertModel's weight files hold no LM head
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["model"])
    tokenizer.save_pretrained(model)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128)).save_pretrained(model)
    sweep.main(["--model_name", str(model), "--dataset", assets["corpus"], "--num_samples", "40", "--max_seq_length", "32",
                "--docs_per_shard", "20", "--output_dir", str(tmp_path / "out"), "--sweep", "--sweep_d_values", "8", "16",
                "--no_wandb"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.count("has no LM head") == 1 and "the downstream pass is skipped" in out
    rows = json.loads((tmp_path / "out" / "sweep_results.json").read_text())
    assert [(r["d_compressed"], r["obtained_by"]) for r in rows] == [(8, "closed_form"), (16, "closed_form")]
    assert all(os.path.exists(r["checkpoint"]) and "downstream_kl" not in r and "downstream_error" not in r for r in rows)


def test_the_closed_form_is_refused_where_sgd_has_no_known_optimum():
    with pytest.raises(UserError, match="closed_form exports PCA"):
        make_config({"closed_form": True, "objective": "kl"})
    assert not make_config({"num_epochs": 3}).closed_form  # epochs asked for: they are trained
    assert not make_config({"init": "orthogonal"}).closed_form


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.integration
@pytest.mark.parametrize("d", ["0", "64", "100", "-4"])
def test_d_prime_outside_1_to_d_minus_1_is_a_one_line_error(shards, tmp_path, capsys, d):
    code, err = run_cli(["--model_name", shards.model_name, "--shards_dir", shards.shards_path,
                         "--output_dir", str(tmp_path), "--d_compressed", d], capsys)
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and ("1..63" in err or "positive integer" in err)


def test_non_integer_d_prime_is_rejected_by_the_parser(capsys):
    code, err = run_cli(["--d_compressed", "12.5"], capsys)
    assert code == 2 and "invalid int value: '12.5'" in err


@pytest.mark.integration
def test_shards_of_another_hidden_size_are_refused(shards, tmp_path, capsys):
    manifest = json.loads(open(os.path.join(shards.shards_path, "manifest.json")).read())
    other = tmp_path / "shards"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "hidden_size": 128}))
    code, err = run_cli(["--model_name", shards.model_name, "--shards_dir", str(other), "--output_dir", str(tmp_path),
                         "--d_compressed", "16"], capsys)
    assert code == 2 and "hidden size 128" in err and "has 64" in err


def test_flags_override_the_yaml_file_which_overrides_the_defaults(tmp_path):
    from trm_ray.config import build_parser, config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("d_compressed: 128\nlearning_rate: 0.5\nuse_wandb: false\n")
    parser = build_parser("t", "t")
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--learning_rate", "0.02"]))
    assert (cfg.d_compressed, cfg.learning_rate, cfg.use_wandb, cfg.batch_size) == (128, 0.02, False, 8)
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--use_wandb", "--no_early_stopping"]))
    assert (cfg.use_wandb, cfg.early_stopping, cfg.torch_compile) == (True, False, True)


def test_unknown_yaml_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("d_compresed: 128\n")
    with pytest.raises(UserError, match="unknown key 'd_compresed'.*did you mean 'd_compressed'"):
        load_yaml(path)


def test_every_shipped_config_parses():
    configs = sorted(p for p in os.listdir("tune_configs") if p.endswith(".yaml"))
    assert "quickstart.yaml" in configs and "smollm3_stage1a.yaml" in configs
    for name in configs:
        make_config(load_yaml(os.path.join("tune_configs", name)))


@pytest.mark.integration
def test_offline_wandb_run_holds_the_metric_history_and_the_best_checkpoint_artifact(swept):
    cfg, rows = swept
    run_dirs = sorted(glob.glob(os.path.join(cfg.output_dir, "wandb", "offline-run-*-qs-d16")))
    assert len(run_dirs) == 1  # one run per trial, rank 0 only
    records = wandb_records(glob.glob(os.path.join(run_dirs[0], "*.wandb"))[0])
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    row = next(r for r in rows if r["d_compressed"] == 16)
    assert [h["epoch"] for h in history] == list(range(1, row["epochs_trained"] + 1))
    # The start (scored before epoch 1, logged with it as initial_mse) is the first candidate for the best.
    assert min([h["mse"] for h in history] + [history[0]["initial_mse"]]) == pytest.approx(row["mse"])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group.startswith("stage1a_sweep-") and run.project == "trm-test"
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.name, a.type) for a in artifacts] == [("compressor-qs-d16", "model")]
    assert [c.path for c in artifacts[0].manifest.contents] == ["compressor.pt"]


# A sweep as `python -m trm_ray.sweep` runs it, which then reports the placement groups its local Ray still holds.
SWEEP_THEN_COUNT_GROUPS = """
import sys
import ray
from trm_ray import sweep
sweep.main(sys.argv[1:])
left = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
print(f"placement groups left: {len(left)}", flush=True)
"""


@pytest.mark.integration
def test_two_local_sweeps_at_once_both_finish_and_leave_no_placement_group(shards, ray_cluster, tmp_path):
    import signal
    import subprocess
    import sys

    # The session's Ray is one local Ray (started as a sweep starts its own); the second sweep, run by
    # `python -m trm_ray.sweep` beside it, starts another, and both sweeps train at once.
    flags = ["--model_name", shards.model_name, "--dataset", shards.dataset, "--shards_dir", shards.shards_path,
             "--num_samples", "120", "--max_seq_length", "64", "--docs_per_shard", "20", "--sweep",
             "--sweep_d_values", "8", "--num_epochs", "1", "--grace_period", "1", "--batch_size", "16",
             "--no_wandb", "--no_torch_compile", "--no_downstream"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # it starts a local Ray of its own
    log = open(tmp_path / "own.log", "w")
    own = subprocess.Popen([sys.executable, "-c", SWEEP_THEN_COUNT_GROUPS, *flags, "--num_cpus", "3",
                            "--output_dir", str(tmp_path / "own")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        from trm_ray import sweep

        sweep.main([*flags, "--output_dir", str(tmp_path / "here"), "--address", "auto"])
        code = own.wait(timeout=240)
    finally:  # on a timeout, the driver is interrupted, which shuts its local Ray down with it
        if own.poll() is None:
            own.send_signal(signal.SIGINT)
            try:
                own.wait(timeout=60)
            except subprocess.TimeoutExpired:
                own.kill()
        log.close()
    text = open(log.name).read()
    assert code == 0, text[-3000:]
    assert "Found multiple active Ray instances" not in text
    assert "placement groups left: 0" in text
    assert not [g for g in ray_cluster.util.placement_group_table().values() if g["state"] != "REMOVED"]
    for out in ("own", "here"):
        rows = json.loads((tmp_path / out / "sweep_results.json").read_text())
        assert [r["d_compressed"] for r in rows] == [8] and "error" not in rows[0]


def test_a_trial_stopped_after_train_replaced_its_reported_checkpoint_exports_the_newer_one(tmp_path):
    import types

    import pandas as pd

    from trm_ray.report import best_checkpoint_path

    # Train keeps one checkpoint: the one of report 2 (what Tune saw last) is gone, report 3's is there.
    run = tmp_path / "d8-lr0.01"
    reported = [run / "checkpoint_2026-12-02_04-00-01.000001", run / "checkpoint_2026-12-02_04-00-02.000002"]
    newer = run / "checkpoint_2026-12-02_04-00-03.000003"
    newer.mkdir(parents=True)
    (newer / "compressor.pt").write_bytes(b"weights")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    result = types.SimpleNamespace(metrics_dataframe=pd.DataFrame({"epoch": [1, 2], "checkpoint_path": map(str, reported)}))
    assert best_checkpoint_path(result) == str(newer)
    reported[-1].mkdir()  # still there: the reported one is the latest
    assert best_checkpoint_path(result) == str(reported[-1])


@pytest.mark.integration
def test_a_resumed_sweep_keeps_the_rungs_and_cuts_asha_recorded_before_the_interruption(ray_cluster, tmp_path):
    import pickle
    import time
    import types

    from trm_ray.names import cuts_name
    from trm_ray.scheduler import PerWidthASHA

    def trial(lr):  # a trial: one learning rate, every D' of the grid
        return types.SimpleNamespace(trial_id=f"t{lr}", config={"learning_rate": lr, "sweep": True, "sweep_d_values": [8, 16]})

    asha = dict(time_attr="tokens_seen", metric="mse", mode="min", max_t=400, grace_period=100, reduction_factor=2)
    group = f"test-{tmp_path.name}"
    scheduler = PerWidthASHA(rungs_path=str(tmp_path / "asha_rungs.json"), group=group, **asha)
    saved = pickle.dumps(scheduler)  # what Tuner.restore unpickles: the scheduler as first built
    good, bad, late = trial(0.01), trial(0.1), trial(0.05)
    for t in (good, bad):
        scheduler.on_trial_add(None, t)
    scheduler.on_trial_result(None, good, {"tokens_seen": 100, "d8/mse": 1.0, "d16/mse": 5.0})
    scheduler.on_trial_result(None, bad, {"tokens_seen": 100, "d8/mse": 2.0, "d16/mse": 1.0})
    assert scheduler.cut == {"lr0.01": [], "lr0.1": [8]}  # worse than "good" at D'=8 alone: the trial goes on with 16
    # The sweep is interrupted here: its driver, and with it the cuts' actor, is gone.
    ray_cluster.kill(scheduler.cuts())
    deadline = time.time() + 30
    while cuts_name(group) in ray_cluster.util.list_named_actors():
        assert time.time() < deadline, "the killed actor kept its name"
        time.sleep(0.1)

    restored = pickle.loads(saved)
    assert restored.cut == {"lr0.01": [], "lr0.1": [8]}  # read back from asha_rungs.json
    for t in (good, bad, late):
        restored.on_trial_add(None, t)
    assert ray_cluster.get(restored.cuts().of.remote("lr0.1", 0)) == [8]  # a fresh actor, started with the saved cuts
    # Milestones 400, 200, 100, each with the scores recorded there before the interruption (ASHA negates a "min" metric).
    assert restored.rungs(8) == [{}, {}, {"t0.01": -1.0, "t0.1": -2.0}]
    # After the resume a third learning rate reaches the first milestone: worst at D'=8 against the saved scores, best at 16.
    restored.on_trial_result(None, late, {"tokens_seen": 100, "d8/mse": 3.0, "d16/mse": 0.5})
    assert restored.cut == {"lr0.01": [], "lr0.1": [8], "lr0.05": [8]}
    assert restored.rungs(16) == [{}, {}, {"t0.01": -5.0, "t0.1": -1.0, "t0.05": -0.5}]
    assert ray_cluster.get(restored.cuts().of.remote("lr0.05", 100)) == [8]  # what the trial reads after its report
    assert ray_cluster.get(restored.cuts().of.remote("lr0.05", 200)) is None  # a report ASHA has not read yet
    assert pickle.loads(pickle.dumps(restored)).cut == restored.cut  # and a second resume keeps it


@pytest.mark.integration
def test_tune_retries_a_trial_whose_node_was_lost_as_often_as_train_retries_its_workers(swept):
    from ray.tune import ExperimentAnalysis

    cfg, _ = swept
    trials = ExperimentAnalysis(os.path.join(cfg.output_dir, "ray_results", "stage1a_sweep")).trials
    assert [(t.config["learning_rate"], t.max_failures) for t in trials] == [(0.01, cfg.max_failures)]
    assert cfg.max_failures == 3
