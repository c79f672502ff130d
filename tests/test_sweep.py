import dataclasses
import json
import os

import pytest
import torch

from trm_ray import sweep
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import UserError, load_yaml, make_config
from trm_ray.shards import load_splits
from trm_ray.train import evaluate, hidden_batches


@pytest.fixture(scope="module")
def swept(shards, tmp_path_factory):
    """The quickstart flow end to end (3 D', ASHA, export), on the session's shards."""
    out = tmp_path_factory.mktemp("sweep")
    cfg = dataclasses.replace(shards, output_dir=str(out), shards_dir=shards.shards_path)
    rows = sweep.run(cfg)
    return cfg, rows


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


def test_exported_checkpoints_load_safely_and_reproduce_the_reported_validation_cosine(swept):
    cfg, rows = swept
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    for r in rows:
        ckpt = torch.load(r["checkpoint"], weights_only=True)
        assert set(ckpt) == {"compressor", "config", "best_loss", "best_metrics"}
        assert ckpt["config"]["d_compressed"] == r["d_compressed"] and ckpt["config"]["d_model"] == 64
        assert ckpt["best_loss"] == pytest.approx(r["mse"])
        model = DimensionCompressor.from_checkpoint(r["checkpoint"]).eval()
        metrics = evaluate(model, hidden_batches(val, 1024, torch.device("cpu")))
        assert metrics["cosine_similarity"] == pytest.approx(r["cosine_similarity"], abs=1e-4)
        assert metrics["mse"] == pytest.approx(r["mse"], rel=1e-4)


def test_a_second_sweep_into_the_same_output_dir_is_refused_without_overwrite(swept):
    cfg, _ = swept
    with pytest.raises(UserError, match="--overwrite"):
        sweep.run(cfg)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("d", ["0", "64", "100", "-4"])
def test_d_prime_outside_1_to_d_minus_1_is_a_one_line_error(shards, tmp_path, capsys, d):
    code, err = run_cli(["--model_name", shards.model_name, "--shards_dir", shards.shards_path,
                         "--output_dir", str(tmp_path), "--d_compressed", d], capsys)
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and ("1..63" in err or "positive integer" in err)


def test_non_integer_d_prime_is_rejected_by_the_parser(capsys):
    code, err = run_cli(["--d_compressed", "12.5"], capsys)
    assert code == 2 and "invalid int value: '12.5'" in err


def test_shards_of_another_hidden_size_are_refused(shards, tmp_path, capsys):
    manifest = json.loads(open(os.path.join(shards.shards_path, "manifest.json")).read())
    other = tmp_path / "shards"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "hidden_size": 128}))
    code, err = run_cli(["--model_name", shards.model_name, "--shards_dir", str(other), "--output_dir", str(tmp_path),
                         "--d_compressed", "16"], capsys)
    assert code == 2 and "hidden size 128" in err and "has 64" in err


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
