"""The hand-over to phase 2: LLM-TRM's own loaders (../shared/llm-trm/src, unmodified) read what
trm_ray exports, and reconstruct exactly as trm_ray does; publishing writes the folder they fetch."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trm_ray import publish, sweep
from trm_ray.compressor import DimensionCompressor, load_checkpoint, plain_state, save_checkpoint
from trm_ray.train import load_splits
from trm_ray.train import hidden_batches, initial_model

from helpers import moved_copy

LLM_TRM = Path(__file__).resolve().parents[2] / "shared" / "llm-trm"
if not (LLM_TRM / "src").is_dir():
    pytest.skip(f"LLM-TRM's code is not at {LLM_TRM}", allow_module_level=True)
sys.path.insert(0, str(LLM_TRM))


def phase2_compressor(path):
    """LLM-TRM phase 2's TRMSequenceTrainer._load_compressor, run as it is. Only its loader: the
    trainer's __init__ would go on to build the TRM, its optimizer and a W&B run."""
    from src.train.phase2_trm import Phase2Config, TRMSequenceTrainer

    trainer = TRMSequenceTrainer.__new__(TRMSequenceTrainer)
    trainer.config = Phase2Config(compressor_checkpoint=str(path), hidden_size=3072, d_compressed=256)
    trainer.device = torch.device("cpu")
    trainer._load_compressor()
    return trainer.config, trainer.compressor


def seed_stage1b_compressor(path, d_model, d_compressed, out_dir):
    """The seed's stage 1b (CompressorPretrainer.train_stage_1b) loading its start, as it is; only the
    training loop after the load (which runs the LLM in every step) is left out."""
    from src.models.compression import DimensionCompressor as SeedCompressor
    from src.train.phase1_compressor import CompressorPretrainer, Phase1Config

    trainer = CompressorPretrainer.__new__(CompressorPretrainer)
    trainer.config = Phase1Config(hidden_size=d_model, d_compressed=d_compressed, stage="1b",
                                  compressor_checkpoint=str(path), output_dir=str(out_dir), use_wandb=False)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    trainer.compressor = SeedCompressor(d_model, d_compressed)
    trainer._run_training_loop = lambda stage: None
    trainer.train_stage_1b()
    return trainer.compressor


def validation_states(cfg, n=512):
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    return next(hidden_batches(val, n, torch.device("cpu")))


def assert_same_reconstruction(theirs, path, x):
    ours = DimensionCompressor.from_checkpoint(path).eval()
    with torch.no_grad():
        z = theirs(x)  # their forward compresses
        torch.testing.assert_close(z, ours.compress(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs.decompress(z), ours(x), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def single_run(shards, tmp_path_factory):
    """One D' trained without --sweep: exported to <output_dir>/stage1a_best.pt."""
    out = tmp_path_factory.mktemp("single")
    cfg = dataclasses.replace(shards, output_dir=str(out), sweep=False, d_compressed=8, num_epochs=1, use_wandb=False,
                              torch_compile=False, downstream=False)  # only its checkpoint is read
    [row] = sweep.run(cfg)
    return row


@pytest.mark.integration
def test_phase2_loads_every_exported_checkpoint_and_reconstructs_as_trm_ray_does(swept, stage1b, single_run):
    cfg, rows_1a = swept
    _, rows_1b, _ = stage1b
    x = validation_states(cfg)
    for row in [*rows_1a, *rows_1b, single_run]:
        config, theirs = phase2_compressor(row["checkpoint"])
        assert (config.hidden_size, config.d_compressed) == (64, row["d_compressed"])
        assert_same_reconstruction(theirs, row["checkpoint"], x)


@pytest.mark.integration
def test_the_seeds_stage_1b_starts_from_trm_rays_stage_1a_checkpoints(swept, tmp_path):
    cfg, rows = swept
    x = validation_states(cfg)
    for row in rows:
        theirs = seed_stage1b_compressor(row["checkpoint"], 64, row["d_compressed"], tmp_path)
        assert_same_reconstruction(theirs, row["checkpoint"], x)


def push_to_hub_module():
    spec = importlib.util.spec_from_file_location("llm_trm_push_to_hub", LLM_TRM / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # binds __main__.Phase1Config to LLM-TRM's, as the script does
    return module


@pytest.mark.integration
def test_publish_writes_the_folder_phase_2_downloads_with_a_card_of_the_real_figures(swept_copy, capsys):
    cfg, rows = swept_copy  # publishing writes into the sweep's output directory
    row = rows[1]
    publish.main([cfg.output_dir, "--d_compressed", str(row["d_compressed"])])
    out = capsys.readouterr().out
    folder = Path(cfg.output_dir) / "hub" / f"d{row['d_compressed']}-stage1a"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "compressor.pt", "sweep_report.png"]
    assert f"hf upload USER/llm-trm-compressor-d16 {folder} . --repo-type model" in out
    card = (folder / "README.md").read_text()
    assert f"| model | `{Path(cfg.model_name).name}` |" in card and "| layer | -1 " in card
    assert "| input dimension D | 64 |" in card and "| compressed dimension D' | 16 |" in card
    assert f"| validation mse | {row['mse']:.6g} |" in card and f"| PCA-limit mse / mse (1.0 = at the limit) | {row['pca_efficiency']:.6g} |" in card
    assert f"| next-token KL at the LM head, nats/token | {row['downstream_kl']:.6g} |" in card
    assert "sweep_d_values:\n- 8\n- 16\n- 32\n" in card and cfg.output_dir not in card  # the settings that made it
    # The file is the exported one, in the layout phase 2 reads, with the row's figures beside the weights.
    published = load_checkpoint(folder / "compressor.pt")
    torch.testing.assert_close(published["compressor"], load_checkpoint(row["checkpoint"])["compressor"], rtol=0, atol=0)
    assert published["best_metrics"]["pca_efficiency"] == row["pca_efficiency"]
    config, theirs = phase2_compressor(folder / "compressor.pt")
    assert_same_reconstruction(theirs, row["checkpoint"], validation_states(cfg))
    # LLM-TRM's own model card reads D, D', the ratio and the metrics off it.
    theirs_card = push_to_hub_module().create_model_card(torch.load(folder / "compressor.pt", weights_only=False), "u/c")
    assert "**Input dimension**: 64" in theirs_card and "**Compressed dimension**: 16" in theirs_card
    assert "**Compression ratio**: 4.0x" in theirs_card and f"| MSE Loss | {row['mse']:.6f} |" in theirs_card
    assert f"| Cosine Similarity | {row['cosine_similarity']:.4f} |" in theirs_card


@pytest.mark.integration
def test_an_upload_without_a_network_is_one_line_and_keeps_the_folder(stage1b, capsys, monkeypatch, tmp_path):
    cfg, rows, _ = stage1b
    cfg = dataclasses.replace(cfg, output_dir=moved_copy(cfg.output_dir, str(tmp_path / "out")))  # it publishes into it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        publish.main([cfg.output_dir, "--d_compressed", "8", "--stage", "1b", "--repo", "someone/llm-trm-compressor"])
    err = capsys.readouterr().err.strip()
    folder = Path(cfg.output_dir) / "hub" / "d8-stage1b"
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert err.startswith("error: upload to someone/llm-trm-compressor failed") and f"the folder {folder} is kept" in err
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "compressor.pt", "sweep_report_stage1b.png"]
    card = (folder / "README.md").read_text()
    assert "stage 1b" in card and "--compressor_checkpoint someone/llm-trm-compressor" in card


@pytest.mark.integration
def test_publishing_a_d_prime_the_sweep_did_not_train_names_those_it_did(swept_copy, capsys):
    cfg, _ = swept_copy
    with pytest.raises(SystemExit):
        publish.main([cfg.output_dir, "--d_compressed", "12"])
    assert capsys.readouterr().err.strip() == f"error: the stage 1a results in {cfg.output_dir} have no D' = 12; they have 8, 16, 32"


@pytest.mark.integration
def test_a_checkpoint_of_the_old_layout_still_starts_stage_1b_and_publishes_converted(swept, tmp_path):
    cfg, rows = swept
    new = load_checkpoint(rows[0]["checkpoint"])
    old = tmp_path / "old" / "stage1a_best.pt"  # W under `weight`, the config a dict: trm_ray's layout until now
    old.parent.mkdir()
    torch.save({"compressor": {"weight": new["compressor"]["compress.weight"]}, "config": {"d_compressed": 8, "d_model": 64},
                "best_loss": new["best_loss"], "best_metrics": new["best_metrics"]}, old)
    start = dataclasses.replace(cfg, stage="1b", sweep=False, d_compressed=8, compressor_checkpoint=str(old))
    model = initial_model(start, 64)
    torch.testing.assert_close(plain_state(model), new["compressor"], rtol=0, atol=0)
    # Published, it comes out in LLM-TRM's layout.
    (tmp_path / "old" / "sweep_results.json").write_text(
        f'[{{"d_compressed": 8, "d_model": 64, "checkpoint": "{old}", "mse": {rows[0]["mse"]}}}]')
    folder = publish.write_folder(str(tmp_path / "old"), 8, "1a", None)
    config, theirs = phase2_compressor(Path(folder) / "compressor.pt")
    assert (config.hidden_size, config.d_compressed) == (64, 8)
    assert_same_reconstruction(theirs, old, validation_states(cfg))


def test_publishing_uploads_what_identifies_the_run_and_nothing_of_the_machine_it_ran_on(tmp_path):
    out, model = tmp_path / "run", tmp_path / "models" / "tiny-smollm3"
    model.mkdir(parents=True)
    settings = {"model_name": str(model), "dataset": "HuggingFaceFW/fineweb-edu", "layer": -1, "learning_rate": 0.003,
                "output_dir": str(out), "shards_dir": str(out / "shards"), "train_storage": str(out / "ray_results"),
                "address": "10.1.2.3:6379", "num_cpus": 16, "group": "stage1a_sweep-1234abcd",
                "command": f"python -m trm_ray.sweep --output_dir {out} --address 10.1.2.3:6379", "d_model": 64}
    checkpoint = out / "d8" / "stage1a_best.pt"
    save_checkpoint(checkpoint, {"compress.weight": torch.linalg.qr(torch.randn(64, 8))[0].T.contiguous()}, settings,
                    0.1, {"mse": 0.1})
    (out / "sweep_results.json").write_text(json.dumps([{"d_compressed": 8, "d_model": 64, "checkpoint": str(checkpoint),
                                                         "mse": 0.1}]))
    folder = Path(publish.write_folder(str(out), 8, "1a", None))
    published = load_checkpoint(folder / "compressor.pt")["config"].to_dict()
    assert published["model_name"] == "tiny-smollm3" and published["dataset"] == "HuggingFaceFW/fineweb-edu"
    assert (published["layer"], published["learning_rate"], published["d_compressed"], published["hidden_size"]) == (-1, 0.003, 8, 64)
    assert not {"output_dir", "shards_dir", "train_storage", "address", "num_cpus", "command", "group"} & set(published)
    for uploaded in folder.iterdir():  # the weights' file and the model card: no directory of this machine, no address
        data = uploaded.read_bytes()
        assert str(tmp_path).encode() not in data and b"10.1.2.3" not in data, uploaded.name
    card = (folder / "README.md").read_text()
    assert "| model | `tiny-smollm3` |" in card and "learning_rate: 0.003" in card
