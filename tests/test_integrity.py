"""Nothing lost, nothing wrong: failed or diverged trials, the summary's files, the split a spectrum
belongs to, resuming, and bad input refused with one line."""

import dataclasses
import json
import multiprocessing
import multiprocessing.synchronize
import os
import shutil

import pandas as pd
import pyarrow as pa
import pytest
import torch
from ray.tune import Result

from trm_ray import extract as extract_mod
from trm_ray import downstream, scoring, spectrum, sweep
from trm_ray.references import eigenvectors
from trm_ray.cluster import forwarded_env, local_cpus
from trm_ray.compressor import save_checkpoint
from trm_ray.names import METRICS
from trm_ray.config import UserError, build_parser, load_yaml, make_config
from trm_ray.model import check_layer, hidden_size_of
from trm_ray.report import _copy, budget_line, export_results, plot_report, save_rows, smallest_within_budget
from trm_ray.scoring import score
from trm_ray.files import read_bytes, write_bytes, write_json
from trm_ray.text import read_documents
from trm_ray.names import CHECKPOINT_FILE

D = 64
LIMIT = {"hidden_size": D, "pca_mse": [0.5] * (D + 1), "pca_cosine_similarity": [0.9] * (D + 1),
         "explained_variance": [0.8] * (D + 1), "pca_explained_variance": [0.8] * (D + 1),
         "pca_centred_cosine_similarity": [0.7] * (D + 1), "pca_centred_explained_variance": [0.6] * (D + 1)}
MANIFEST = {"hidden_size": D, "layer": -1, "exclude_first_token": True}


def trial_result(root, lr, mses, error=None, epochs=3, start=None):
    """What Tune hands back for one trial (one learning rate, every D' of `mses`: D' -> validation mse,
    None for a width with no checkpoint): its metrics, error, and the checkpoint directory it reported
    last; `start`: the initial_* metrics its first report had for each width."""
    ckpt_dir = root / f"ckpt-lr{lr}"
    history = {"epoch": [epochs], "checkpoint_path": [str(ckpt_dir)]}
    for d, mse in mses.items():
        history[f"d{d}/epochs_trained"] = [epochs]
        history.update({f"d{d}/initial_{k}": [v] for k, v in (start or {}).items()})
        if mse is not None:
            metrics = {k: 0.5 for k in METRICS} | {"mse": mse, "downstream_kl": mse / 10, "epoch": epochs}
            save_checkpoint(ckpt_dir / f"d{d}" / CHECKPOINT_FILE,
                            {"compress.weight": torch.linalg.qr(torch.randn(D, d))[0].T.contiguous()}, {"d_compressed": d},
                            mse, metrics)
    return Result(metrics={"config": {"learning_rate": lr}, "epoch": epochs},
                  checkpoint=None, error=error, path=str(root), metrics_dataframe=pd.DataFrame(history))


def export_config(out, **overrides):
    return make_config({"output_dir": str(out), "sweep": True, "sweep_d_values": [8, 16], "num_epochs": 3,
                        "downstream": False, **overrides})


def test_a_trial_that_errored_after_reporting_checkpoints_is_a_failed_row_not_an_export(tmp_path):
    cfg = export_config(tmp_path / "out")
    grid = [trial_result(tmp_path, 0.001, {8: 0.1, 16: 0.05}, error=RuntimeError("worker died 4 times\ntraceback..."))]
    rows = export_results(grid, cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    assert rows[0] == {"d_compressed": 8, "d_model": D, "compression_ratio": 8.0, "num_params": 512, "objective": "mse",
                       "error": "RuntimeError: worker died 4 times"}
    assert "checkpoint" not in rows[1] and not os.path.exists(cfg.export_path(8))
    assert json.loads((tmp_path / "out" / "sweep_results.json").read_text()) == rows


def test_a_width_with_nothing_to_export_fails_its_row_alone(tmp_path):
    cfg = export_config(tmp_path / "out")
    rows = export_results([trial_result(tmp_path, 0.001, {8: None, 16: 0.05})], cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    assert rows[0]["error"] == "no checkpoint was reported" and not os.path.exists(cfg.export_path(8))
    assert rows[1]["stop_reason"] == "completed all epochs" and "error" not in rows[1]
    assert os.path.exists(cfg.export_path(16))


def test_a_kl_trials_row_carries_the_validation_kl_and_cosine_of_its_start(tmp_path):
    cfg = export_config(tmp_path / "out", objective="kl", sweep_d_values=[8])
    grid = [trial_result(tmp_path, 0.005, {8: 0.1}, start={"downstream_kl": 0.031, "cosine_similarity": 0.97})]
    (row,) = export_results(grid, cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    assert (row["initial_downstream_kl"], row["initial_cosine_similarity"]) == (0.031, 0.97)
    assert "initial_downstream_kl" not in export_results(grid, export_config(tmp_path / "mse", sweep_d_values=[8]),
                                                         MANIFEST, CHECKPOINT_FILE, LIMIT)[0]


def test_a_kl_sweeps_rows_keep_the_kl_its_trials_were_selected_on_without_the_downstream_pass(tmp_path):
    cfg = export_config(tmp_path / "out", objective="kl", sweep_d_values=[8], downstream=False)
    (row,) = export_results([trial_result(tmp_path, 0.005, {8: 0.1})], cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    assert row["downstream_kl"] == pytest.approx(0.01)  # the checkpoint's best_metrics: its trial's whole validation set
    assert row["within_kl_budget"] is True  # 0.01 <= the default budget, 0.1


def budget_rows(kls):
    return [{"d_compressed": d, "compression_ratio": 64 / d, **({"downstream_kl": kl, "top1_agreement": 0.9} if kl else {})}
            for d, kl in kls.items()]


def test_the_kl_budget_names_the_smallest_d_prime_within_it_or_the_best_kl_when_none_is():
    rows = budget_rows({8: 0.5, 16: 0.09, 32: 0.02, 48: None})  # 48: its downstream pass failed
    assert smallest_within_budget(rows, 0.1)["d_compressed"] == 16
    assert smallest_within_budget(rows, 0.02)["d_compressed"] == 32  # within: at most the budget
    assert smallest_within_budget(rows, 1.0)["d_compressed"] == 8
    assert budget_line(rows, 0.1) == ("kl budget 0.1 nats/token: the smallest D' within it is 16 (4.0x; next-token KL "
                                      "0.09, top-1 agreement 90.00%)")
    assert smallest_within_budget(rows, 0.01) is None
    assert budget_line(rows, 0.01) == ("kl budget 0.01 nats/token: no D' is within it; the best next-token KL is 0.02 "
                                       "at D'=32 (sweep wider D', or raise --kl_budget)")
    assert budget_line(budget_rows({8: None}), 0.1) is None  # no KL measured: nothing to say


def test_a_nan_trial_never_beats_a_finite_one_of_the_same_d_prime(tmp_path):
    cfg = export_config(tmp_path / "out", sweep_d_values=[8], sweep_learning_rates=[0.5, 0.01])
    grid = [trial_result(tmp_path, 0.5, {8: float("nan")}), trial_result(tmp_path, 0.01, {8: 0.2})]
    [row] = export_results(grid, cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    assert (row["learning_rate"], row["mse"]) == (0.01, 0.2)
    assert "error" not in row  # a diverged learning rate beside a good one is not a failed sweep
    [row] = export_results(grid[:1], cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    assert row["error"] == "lr 0.5: validation mse is nan" and "checkpoint" not in row


@pytest.mark.integration
def test_a_diverging_trial_stops_after_its_first_epoch_and_exports_its_start_with_the_reason(shards, tmp_path):
    # Free rows (--no_orthonormal): the retraction would keep even this rate's weights finite.
    cfg = dataclasses.replace(shards, output_dir=str(tmp_path), shards_dir=shards.shards_path, sweep=False, d_compressed=8,
                              num_epochs=3, learning_rate=1e30, orthonormal=False, use_wandb=False, torch_compile=False,
                              downstream=False)
    [row] = sweep.run(cfg)
    assert row["stop_reason"].startswith("diverged: train loss") and row["stop_reason"].endswith("lower --learning_rate")
    # The diverged weights never win: what is exported is the start, scored before the first epoch.
    assert row["best_epoch"] == 0 and row["pca_efficiency"] == pytest.approx(1.0, abs=1e-3)
    assert row["note"].startswith("d8: diverged: train loss") and "epoch 0" in row["note"]
    progress = tmp_path / "ray_results" / "stage1a_d8" / "lr1e+30" / "progress.csv"
    assert sum(1 for _ in open(progress)) - 1 == 1  # one epoch reported, then stopped


def test_trials_of_one_d_prime_with_different_learning_rates_get_different_run_names():
    cfg = make_config({"sweep": True, "sweep_learning_rates": [0.01, 0.001], "d_compressed": 8})
    names = {dataclasses.replace(cfg, learning_rate=lr).run_label(8) for lr in cfg.sweep_learning_rates}
    assert names == {"d8-lr0.01", "d8-lr0.001"}
    assert make_config({"d_compressed": 8}).run_label(8) == "d8"  # no lr grid: the name the seed's runs had


@pytest.mark.parametrize("values, message", [
    ({"sweep_d_values": [64, 128, 64]}, "sweep_d_values lists 64 more than once"),
    ({"sweep_learning_rates": [0.001, 0.0010000001]}, "sweep_learning_rates lists 0.001 more than once"),
])
def test_repeated_grid_values_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        make_config(values)


@pytest.mark.integration
def test_a_failing_downstream_pass_keeps_the_summary_and_says_why(ray_cluster, tmp_path):
    cfg = export_config(tmp_path / "out", downstream=True, model_name=str(tmp_path / "not-a-model"))
    rows = export_results([trial_result(tmp_path, 0.001, {8: 0.1, 16: 0.05})], cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    score(rows, cfg, MANIFEST)
    save_rows(rows, cfg)
    assert rows[0]["mse"] == 0.1 and rows[0]["downstream_error"].startswith("UserError: model path ")
    assert json.loads((tmp_path / "out" / "sweep_results.json").read_text()) == rows
    assert os.path.exists(cfg.export_path(8))


def test_a_failing_region_pass_is_reported_as_itself_and_keeps_the_downstream_kl(tmp_path, monkeypatch, capsys):
    cfg = export_config(tmp_path / "out", downstream=True, stage="1b", sweep_d_values=[8],
                        shards_dir=str(tmp_path / "no-shards"))
    monkeypatch.setattr(downstream, "check_lm_head", lambda model_name: True)  # a model with a head that reproduces
    monkeypatch.setattr(downstream, "measure", lambda use_gpu, model_name, *args: {8: {"downstream_kl": 0.0125}})
    manifest = {**MANIFEST, "keep_tokens": "phase2", "regions": ["context", "close"]}  # two regions: scored apart
    (row,) = export_results([trial_result(tmp_path, 0.001, {8: 0.1})], cfg, manifest, CHECKPOINT_FILE, LIMIT)
    score([row], cfg, manifest)
    assert row["downstream_kl"] == 0.0125 and "downstream_error" not in row
    assert row["regions_error"].startswith(f"UserError: shard directory {cfg.shards_path} does not exist")
    out = capsys.readouterr().out
    assert "the per-region scores failed (UserError: shard directory" in out and "downstream KL failed" not in out
    assert any(k in row for k in scoring.FAILURES)  # a failed pass is a failed sweep: exit status 1


def test_an_output_dir_named_results_gets_its_plot_inside_it(tmp_path):
    out = tmp_path / "results" / "run"
    cfg = export_config(out)
    rows = export_results([trial_result(tmp_path, 0.001, {8: 0.1, 16: 0.05})], cfg, MANIFEST, CHECKPOINT_FILE, LIMIT)
    plot_report(rows, LIMIT, cfg, MANIFEST)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["sweep_report.png", "sweep_results.csv",
                                                                    "sweep_results.json"]
    assert not (tmp_path / "report").exists()


def test_a_bad_copy_never_replaces_a_good_export(tmp_path):
    good = trial_result(tmp_path, 0.001, {8: 0.1}).metrics_dataframe["checkpoint_path"][0] + "/d8/" + CHECKPOINT_FILE
    dest = tmp_path / "d8" / "stage1a_best.pt"
    _copy(good, str(dest))
    before = dest.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(UserError, match="cannot be read"):
        _copy(str(bad), str(dest))
    assert dest.read_bytes() == before and os.listdir(dest.parent) == ["stage1a_best.pt"]


WRITES, PAYLOAD = 200, 64 * 1024


def write_many(path: str, writer: int, start: multiprocessing.synchronize.Barrier) -> None:
    """One sweep's writes of a shared file: every payload is one byte repeated, so a read tells a whole file from a torn one."""
    start.wait()  # both writers and the reader at once, not one after the other's imports
    for i in range(WRITES):
        write_bytes(path, bytes([(writer * WRITES + i) % 256]) * PAYLOAD)


def test_two_processes_writing_one_file_both_succeed_and_every_read_is_a_whole_file(tmp_path):
    path = str(tmp_path / "spectrum.pt")
    write_bytes(path, b"\0" * PAYLOAD)
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(3)
    writers = [spawn.Process(target=write_many, args=(path, w, start)) for w in (0, 1)]
    for p in writers:
        p.start()
    start.wait()
    reads = []
    while any(p.is_alive() for p in writers):
        reads.append(read_bytes(path))
    for p in writers:
        p.join()
    assert [p.exitcode for p in writers] == [0, 0]  # no writer's rename failed
    assert reads and all(len(r) == PAYLOAD and r == r[:1] * PAYLOAD for r in reads)
    assert os.listdir(tmp_path) == ["spectrum.pt"]  # no temporary file left behind


@pytest.mark.integration
def test_each_split_keeps_its_own_spectrum(shards, tmp_path):
    shards_dir = str(tmp_path / "shards")
    shutil.copytree(shards.shards_path, shards_dir, ignore=shutil.ignore_patterns("spectrum*"))
    first = spectrum.load_or_compute(shards_dir, 0.1, 42)
    vecs = eigenvectors(shards_dir, 0.1, 42)
    other = spectrum.load_or_compute(shards_dir, 0.1, 7)  # e.g. `python -m trm_ray.spectrum DIR --seed 7`
    assert other["split"] == {"val_fraction": 0.1, "seed": 7} and other["train_tokens"] != first["train_tokens"]
    assert spectrum.load_or_compute(shards_dir, 0.1, 42) == first
    assert torch.equal(eigenvectors(shards_dir, 0.1, 42), vecs)
    assert not torch.equal(eigenvectors(shards_dir, 0.1, 7), vecs)


@pytest.mark.integration
def test_shards_extracted_with_a_relative_model_path_are_the_sweeps_shards(shards, tmp_path, monkeypatch):
    model = os.path.abspath(shards.model_name)
    monkeypatch.chdir(os.path.dirname(model))
    shards_dir = str(tmp_path / "s")
    extract_mod.main(["--model_name", os.path.basename(model), "--dataset", shards.dataset, "--num_samples", "20",
                      "--docs_per_shard", "20", "--max_seq_length", "16", "--shards_dir", shards_dir])
    manifest = json.loads(open(os.path.join(shards_dir, "manifest.json")).read())
    assert manifest["model"] == model
    sweep_side = make_config({"model_name": model, "dataset": shards.dataset, "num_samples": 20, "docs_per_shard": 20,
                              "max_seq_length": 16, "shards_dir": shards_dir})
    assert extract_mod.extract(sweep_side) == manifest  # reused as they are, not refused


def test_a_sweep_that_crashed_before_tune_saved_anything_starts_afresh(tmp_path):
    cfg = export_config(tmp_path)
    exp_dir = tmp_path / "ray_results" / "stage1a_sweep"
    write_json(str(exp_dir / sweep.SWEEP_CONFIG), dataclasses.asdict(cfg))  # all such a crash leaves
    assert sweep.should_resume(str(exp_dir), cfg, overwrite=False) is False
    assert sweep.should_resume(str(exp_dir), dataclasses.replace(cfg, learning_rate=0.5), overwrite=False) is False


def resume_args(argv):
    parser = build_parser("t", "t")
    parser.add_argument("--resume")
    return parser.parse_args(argv)


def test_resume_picks_the_sweep_by_stage_and_applies_runtime_flags(tmp_path):
    for stage in ("1a", "1b"):
        cfg = export_config(tmp_path, stage=stage, learning_rate=0.02)
        write_json(str(tmp_path / "ray_results" / f"stage{stage}_sweep" / sweep.SWEEP_CONFIG), dataclasses.asdict(cfg))
    with pytest.raises(UserError, match=r"holds 2 trm_ray sweeps to resume: pass --stage \(1a or 1b\)"):
        sweep.command_config(resume_args(["--resume", str(tmp_path)]))
    cfg = sweep.command_config(resume_args(["--resume", str(tmp_path), "--stage", "1b", "--address", "auto",
                                            "--no_wandb", "--num_cpus", "6"]))
    assert (cfg.stage, cfg.learning_rate, cfg.address, cfg.use_wandb, cfg.num_cpus) == ("1b", 0.02, "auto", False, 6)
    with pytest.raises(UserError, match="--learning_rate cannot change them"):
        sweep.command_config(resume_args(["--resume", str(tmp_path), "--stage", "1a", "--learning_rate", "0.1"]))


@pytest.mark.parametrize("flag", ["--max_concurrent_trials", "--max_failures"])
def test_resume_refuses_the_limits_tune_restores_as_saved(tmp_path, flag):
    # Tune restores its search's concurrency limit and each trial's retry budget from the sweep's saved state.
    write_json(str(tmp_path / "ray_results" / "stage1a_sweep" / sweep.SWEEP_CONFIG), dataclasses.asdict(export_config(tmp_path)))
    with pytest.raises(UserError, match=f"^--resume continues a sweep with its own settings; {flag} cannot change them "
                                        r"\(only --address, --num_cpus, --use_wandb and --stage may be given\)$"):
        sweep.command_config(resume_args(["--resume", str(tmp_path), flag, "2"]))


@pytest.mark.parametrize("values, message", [
    ({"sweep_d_values": 64}, r"sweep_d_values must be a list, got 64: write e.g. sweep_d_values: \[64\]"),
    ({"seed": -1}, "seed must be 0 or more, got -1"),
    ({"grace_period": 0}, "grace_period must be at least 1, got 0"),
    ({"use_gpu": "false"}, "use_gpu must be true or false, got 'false'"),
    ({"asha_metric": "cosine"}, "asha_metric must be one of pca_efficiency, mse, cosine_similarity"),
    ({"asha_metric": "downstream_efficiency"}, "asha_metric downstream_efficiency is measured only with --objective kl"),
    ({"sweep_learning_rates": [0.01, "fast"]}, "sweep_learning_rates must be a number, got 'fast'"),
    ({"init": "fisher"}, "init fisher weights directions by the LM head, which --objective mse never reads"),
])
def test_bad_settings_are_one_line_errors(values, message):
    with pytest.raises(UserError, match=message):
        make_config(values)


@pytest.mark.parametrize("metric, mode", [("downstream_efficiency", "max"), ("downstream_kl", "min")])
def test_a_kl_sweep_may_name_the_downstream_metrics_for_asha(metric, mode):
    cfg = make_config({"objective": "kl", "asha_metric": metric})
    assert cfg.rank_metric == metric
    assert ("min" if metric in sweep.LOWER_IS_BETTER else "max") == mode


@pytest.mark.parametrize("name, content, message", [
    ("bare.jsonl", '{"text": "the river"}\n"a bare string"\n', r"bare.jsonl:2 is a JSON str, not an object of fields"),
    ("array.json", '[{"text": "the river"}, 5]', r"array.json\[1\] is a JSON int, not an object of fields"),
])
def test_json_records_that_are_not_objects_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        read_documents(make_config({"dataset": str(tmp_path / name)}))


def test_a_json_array_of_records_is_a_corpus(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"text": "the river"}, {"text": "a cold cell"}], indent=1))
    assert read_documents(make_config({"dataset": str(tmp_path / "c.json")})) == ["the river", "a cold cell"]


def test_a_parquet_corpus_is_read_only_as_far_as_needed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(5000)]}), tmp_path / "c.parquet", row_group_size=1000)
    assert read_documents(make_config({"dataset": str(tmp_path / "c.parquet"), "num_samples": 3})) == ["doc 0", "doc 1", "doc 2"]


@pytest.mark.parametrize("config", ["T5Config", "DistilBertConfig"])
def test_a_model_without_a_causal_lm_head_is_refused(tmp_path, config):
    import transformers

    getattr(transformers, config)().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="without a causal-LM head"):
        hidden_size_of(str(tmp_path))


@pytest.mark.parametrize("beyond", [1, -1, 90])
def test_a_layer_outside_the_model_is_refused(assets, beyond):
    layers = json.loads(open(os.path.join(assets["model"], "config.json")).read())["num_hidden_layers"]
    cfg = make_config({"model_name": assets["model"], "layer": layers + beyond if beyond > 0 else -(layers + 1) + beyond})
    with pytest.raises(UserError, match=f"outside .* give -{layers + 1}..{layers}"):
        check_layer(cfg.model_name, cfg.layer)
    for ok in (-(layers + 1), -1, 0, layers):
        check_layer(cfg.model_name, ok)


def test_secret_names_are_matched_in_any_case():
    environ = {"WANDB_MODE": "offline", "WANDB_api_key": "k", "HF_Token": "t", "RAY_DATA_Secret_X": "s"}
    assert forwarded_env(environ) == {"WANDB_MODE": "offline"}


def test_a_local_ray_has_room_for_the_trials_the_cores_can_run(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = make_config({"sweep": True, "sweep_d_values": [8, 16, 32]})
    assert local_cpus(cfg) == 3  # one learning rate: 1 trial (every D'), its Tune function and worker, one for Ray Data
    grid = dataclasses.replace(cfg, sweep_learning_rates=[0.01, 0.02, 0.05])
    assert local_cpus(grid) == 5  # 2 trials at once (the cores), each a Tune function and a worker, and one for Ray Data
    assert local_cpus(dataclasses.replace(grid, num_workers=2)) == 4  # 1 trial of 2 workers
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert local_cpus(grid) == 64


@pytest.mark.integration
def test_a_validation_pass_reads_only_the_validation_documents_row_groups(shards, tmp_path):
    import pyarrow.parquet as pq

    from trm_ray.shards import is_validation_doc, read_manifest, shard_paths, side_row_groups, side_tables

    manifest = read_manifest(shards.shards_path)
    for path in shard_paths(shards.shards_path, manifest):
        meta = pq.read_metadata(path)
        docs = [meta.row_group(i).column(0).statistics.min for i in range(meta.num_row_groups)]
        assert docs == sorted(set(pq.read_table(path, columns=["doc_id"])["doc_id"].to_pylist()))  # one document each
        val = is_validation_doc(pq.read_table(path)["doc_id"].to_numpy(), shards.val_fraction, shards.seed)
        groups = side_row_groups(meta, shards.val_fraction, shards.seed, True)
        assert sum(meta.row_group(i).num_rows for i in groups) == val.sum()  # nothing else is read
        # A shard of the earlier layout (one row group of many documents) gives the same rows, filtered.
        old = tmp_path / "old.parquet"
        pq.write_table(pq.read_table(path), old)
        for side in (True, False):
            new_rows, old_rows = (pa.concat_tables(list(side_tables(str(p), shards.val_fraction, shards.seed, side, 50)) or
                                                   [pq.read_table(path).slice(0, 0).select(["doc_id", "position", "token_id", "hidden"])])
                                  for p in (path, old))
            assert new_rows.equals(old_rows)


def test_a_local_ray_runs_only_the_trials_whose_workers_fit_and_refuses_one_that_never_fits():
    cfg = make_config({"sweep": True, "sweep_d_values": [8, 16, 32]})
    cpus = {"CPU": 8.0, "memory": 2e9, "object_store_memory": 1e9}
    assert sweep.trials_that_fit(cfg, cpus) == 3  # 2 CPUs a trial, one left for Ray Data's reads
    assert sweep.trials_that_fit(dataclasses.replace(cfg, num_workers=3), cpus) == 1
    # A cluster that cannot grow deadlocks past what it holds (the Tune functions take the workers' CPUs): capped alike.
    assert sweep.trials_that_fit(dataclasses.replace(cfg, address="auto"), cpus) == 3
    # One whose autoscaler may add nodes: as many as the grown cluster holds, and the trials waiting for their
    # workers are what it adds nodes for; a trial larger than the grown cluster is refused before anything runs.
    grows = dataclasses.replace(cfg, address="auto", use_gpu=True, sweep_learning_rates=[1e-3, 2e-3, 4e-3])
    assert sweep.trials_that_fit(grows, cpus, {"CPU": 8.0 + 2 * 32, "GPU": 2.0}) == 2
    with pytest.raises(UserError, match=r"needs 1 CPU, 4 GPU .* this cluster's autoscaler grows it to at most 72 CPU, "
                                        r"2 GPU: pass fewer --num_workers, or raise the node types' max_workers in cluster.yaml"):
        sweep.trials_that_fit(dataclasses.replace(grows, num_workers=4), cpus, {"CPU": 8.0 + 2 * 32, "GPU": 2.0})
    cluster = dataclasses.replace(cfg, address="auto", use_gpu=True)
    assert sweep.trials_that_fit(cluster, {**cpus, "GPU": 2.0}) == 2
    assert sweep.trials_that_fit(cluster, cpus) is None  # no GPU node yet: the autoscaler must add one for any trial
    needs = r"a trial needs 9 CPU \(its Tune function and 8 worker\(s\)\) and 1 more CPU for Ray Data; the local Ray has 8 CPU"
    with pytest.raises(UserError, match=needs):
        sweep.trials_that_fit(dataclasses.replace(cfg, num_workers=8), cpus)
    with pytest.raises(UserError, match="needs 1 CPU, 1 GPU .* the local Ray has 8 CPU, 0 GPU: .* --no_use_gpu"):
        sweep.trials_that_fit(dataclasses.replace(cfg, use_gpu=True), cpus)


def test_a_sweep_says_what_it_will_hold_and_warns_when_gpus_would_sit_idle():
    node = {"CPU": 96.0, "GPU": 8.0}  # one 8-GPU node
    one_trial = make_config({"sweep": True, "sweep_d_values": [64, 128], "use_gpu": True})
    lines = sweep.usage(one_trial, node, sweep.trials_that_fit(one_trial, node))
    assert lines == ["sweep: 1 trial (a learning rate each, every D' in each) x 1 worker x 1 GPU = 1 GPUs, "
                     "1 trial at once (1 GPUs of the 8 the Ray has now)",
                     "sweep: warning: 7 of the Ray's 8 GPUs would sit idle while the trials train: pass --num_workers 8 "
                     "(a trial's steps and validation are split over its workers)"]
    filled = dataclasses.replace(one_trial, num_workers=8)
    assert len(sweep.usage(filled, node, sweep.trials_that_fit(filled, node))) == 1  # no warning
    on_cpus = dataclasses.replace(one_trial, use_gpu=False)
    assert sweep.usage(on_cpus, node, 3)[-1].endswith("8 of the Ray's 8 GPUs would sit idle while the trials train: pass --use_gpu")
    growing = dataclasses.replace(one_trial, address="auto")
    assert "its autoscaler must add nodes" in sweep.usage(growing, {"CPU": 4.0}, None)[0]
    # A head without GPUs whose autoscaler may add up to two 8-GPU nodes: counted on the grown cluster.
    most = {"CPU": 4.0 + 2 * 96, "GPU": 16.0}
    first, warning = sweep.usage(growing, {"CPU": 4.0}, sweep.trials_that_fit(growing, {"CPU": 4.0}, most), most)
    assert first.endswith("1 trial at once (1 GPUs of the 0 the Ray has now, 16 once its autoscaler has added nodes)")
    assert warning.startswith("sweep: warning: 15 of the 16 GPUs its autoscaler can give it would sit idle")
    # The shipped stage 1b config fills one 8-GPU node by itself.
    shipped = make_config(load_yaml(os.path.join("tune_configs", "smollm3_stage1b.yaml")))
    [line] = sweep.usage(shipped, node, sweep.trials_that_fit(shipped, node))
    assert "= 8 GPUs, 8 trials at once (8 GPUs of the 8" in line


def test_on_one_gpu_the_trials_of_a_gpu_sweep_run_one_at_a_time():
    # The machine most users have: 16 CPUs and one GPU. Each trial's worker holds the GPU, so a second
    # trial at once would wait for it inside Train until its start timeout failed the trial.
    cfg = make_config({"sweep": True, "sweep_d_values": [64, 128, 256, 512, 1024], "use_gpu": True})
    assert sweep.trials_that_fit(cfg, {"CPU": 16.0, "GPU": 1.0}) == 1
    assert sweep.trials_that_fit(cfg, {"CPU": 16.0, "GPU": 4.0}) == 4
    assert sweep.trials_that_fit(dataclasses.replace(cfg, num_workers=2), {"CPU": 16.0, "GPU": 4.0}) == 2
    assert sweep.trials_that_fit(cfg, {"CPU": 3.0, "GPU": 4.0}) == 2  # then the CPUs of the Tune functions decide
