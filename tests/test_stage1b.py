import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from trm_ray import sweep
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import UserError
from trm_ray.text import chat_settings, read_documents
from trm_ray.shards import load_splits, read_manifest, shard_paths
from trm_ray.spectrum import training_mean
from trm_ray.train import evaluate, hidden_batches, initial_model, trial_config


def test_stage_1b_exports_beside_stage_1a(stage1b):
    cfg, rows, rows_1a = stage1b
    assert [r["d_compressed"] for r in rows] == [8, 16]
    for r, r_1a in zip(rows, rows_1a):
        assert r["checkpoint"] == r_1a["checkpoint"].replace("stage1a_best.pt", "stage1b_best.pt")


def test_stage_1b_starts_from_the_stage_1a_weights(stage1b):
    cfg, rows, rows_1a = stage1b
    # The weights the worker builds before its first step are the 1a checkpoint's.
    for d, r_1a in ((8, rows_1a[0]), (16, rows_1a[1])):
        config = {**sweep.dataclasses.asdict(cfg), "d_compressed": d, "d_model": 64}
        model = initial_model(*trial_config(config))
        torch.testing.assert_close(model.weight, DimensionCompressor.from_checkpoint(r_1a["checkpoint"]).weight, rtol=0, atol=0)
    # And the run's first report scored exactly those weights on the 1b validation set.
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    for r, r_1a in zip(rows, rows_1a):
        start = evaluate(DimensionCompressor.from_checkpoint(r_1a["checkpoint"]), hidden_batches(val, 512, torch.device("cpu")),
                         training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed))
        assert r["initial_cosine_similarity"] == pytest.approx(start["cosine_similarity"], abs=1e-6)


def test_stage_1b_shards_hold_only_the_thinking_span(stage1b, assets):
    cfg, _, _ = stage1b
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
    manifest = read_manifest(cfg.shards_path)
    assert manifest["stage"] == "1b" and manifest["keep_tokens"] == "thinking"
    assert manifest["chat"] == chat_settings(tokenizer, cfg)
    table = pq.read_table(shard_paths(cfg.shards_path, manifest)[0])
    docs = read_documents(cfg)
    for doc in (0, 5, 39):
        # The span is the assistant message's own, not the first <think> of the rendered prompt
        # (on a real template that is the system prompt's; see tests/test_text.py).
        inside = docs[doc][-1]["content"].split("<think>")[1].split("</think>")[0]
        expected = tokenizer(inside, add_special_tokens=False)["input_ids"]
        rows = table["doc_id"].to_numpy() == doc
        assert table["token_id"].to_numpy()[rows].tolist() == expected
    specials = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<|im_start|>", "<|im_end|>"]))
    assert specials.isdisjoint(np.unique(table["token_id"].to_numpy()).tolist())


def test_stage_1b_without_a_stage_1a_checkpoint_is_refused(stage1b, tmp_path):
    cfg, _, _ = stage1b
    with pytest.raises(UserError, match="stage1a_best.pt does not exist: run stage 1a first"):
        sweep.prepare(sweep.dataclasses.replace(cfg, output_dir=str(tmp_path)))


def test_stage_1b_from_a_checkpoint_of_another_d_prime_names_both_shapes(stage1b, swept):
    cfg, _, rows_1a = stage1b
    wrong = sweep.dataclasses.replace(cfg, sweep=False, d_compressed=16, compressor_checkpoint=rows_1a[0]["checkpoint"])
    with pytest.raises(UserError, match="D'xD = 8x64, but this run needs 16x64"):
        sweep.prepare(wrong)
