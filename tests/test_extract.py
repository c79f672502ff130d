import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trm_ray import extract as extract_mod
from trm_ray.config import UserError, make_config
from trm_ray.extract import Placement, extract, hidden_rows, length_batches, placement, resolve_storage_dtype, shard_table
from trm_ray.model import load_model
from trm_ray.text import read_documents
from trm_ray.hidden import decode_hidden
from trm_ray.shards import read_manifest, shard_paths



def read_rows(cfg):
    manifest = read_manifest(cfg.shards_path)
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths(cfg.shards_path, manifest)])
    return manifest, table


@pytest.mark.integration
def test_extracted_hidden_states_equal_a_direct_model_call(shards):
    manifest, table = read_rows(shards)
    tokenizer = AutoTokenizer.from_pretrained(shards.model_name)
    model = AutoModelForCausalLM.from_pretrained(shards.model_name).eval()
    texts = read_documents(shards)
    doc_ids = table["doc_id"].to_numpy()
    hidden = decode_hidden(table["hidden"])
    for doc in (0, 7, 119):
        enc = tokenizer(texts[doc], truncation=True, max_length=shards.max_seq_length, return_tensors="pt")
        with torch.no_grad():
            expected = model(**enc, output_hidden_states=True).hidden_states[-1][0]
        rows = doc_ids == doc
        length = enc["input_ids"].shape[1]
        # Every real token but the first (an attention sink, left out by default).
        assert table["position"].to_numpy()[rows].tolist() == list(range(1, length))
        assert table["token_id"].to_numpy()[rows].tolist() == enc["input_ids"][0, 1:].tolist()
        torch.testing.assert_close(hidden[torch.from_numpy(rows)], expected[1:], atol=1e-5, rtol=1e-5)


def test_pad_positions_never_reach_the_shards(assets):
    tokenizer, model, _ = load_model(assets["model"], torch.device("cpu"), -1)
    token_lists = [tokenizer("the river")["input_ids"], tokenizer("the old teacher finds a cold cell near the school.")["input_ids"]]
    hidden, docs, positions = hidden_rows(model, token_lists, tokenizer.pad_token_id, tokens_per_batch=1000, max_batch=2)
    assert hidden.shape[0] == sum(len(t) for t in token_lists)  # one row per real token, none for the 9 pads
    assert docs.tolist() == [0] * len(token_lists[0]) + [1] * len(token_lists[1])
    # Batched with padding or alone, the short document's states are the same.
    alone, _, _ = hidden_rows(model, token_lists[:1], tokenizer.pad_token_id, tokens_per_batch=1000, max_batch=1)
    torch.testing.assert_close(hidden[: len(token_lists[0])], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [-1, 2, -2, 0])
def test_model_cut_at_a_layer_gives_that_layer_of_the_full_models_hidden_states(assets, layer):
    full = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    tokenizer, cut, how = load_model(assets["model"], torch.device("cpu"), layer)
    num_layers = full.config.num_hidden_layers
    assert how == "blocks" and len(cut.layers) == layer % (num_layers + 1) and not hasattr(cut, "lm_head")
    texts = ["the river", "the old teacher finds a cold cell near the school.", "a quiet green garden"]
    token_lists = [tokenizer(t)["input_ids"] for t in texts]
    hidden, docs, positions = hidden_rows(cut, token_lists, tokenizer.pad_token_id, tokens_per_batch=24, max_batch=8)
    for doc, ids in enumerate(token_lists):
        with torch.no_grad():
            expected = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        torch.testing.assert_close(hidden[torch.from_numpy(docs == doc)], expected, atol=1e-5, rtol=1e-5)
        assert positions[docs == doc].tolist() == list(range(len(ids)))


def test_a_layer_beyond_the_model_is_a_user_error(assets):
    with pytest.raises(UserError, match="out of range"):
        load_model(assets["model"], torch.device("cpu"), 99)


def test_batches_group_similar_lengths_within_the_token_budget_and_cover_every_document():
    lengths = [5, 30, 7, 28, 6, 100, 29]
    batches = length_batches(lengths, tokens_per_batch=90, max_batch=2)
    assert batches == [[5], [1, 6], [3, 2], [4, 0]]
    assert all(len(b) * lengths[b[0]] <= 90 or len(b) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


@pytest.mark.integration
def test_manifest_records_model_layer_sizes_and_counts(shards):
    manifest, table = read_rows(shards)
    assert manifest["model"] == shards.model_name
    assert manifest["layer"] == -1
    assert manifest["hidden_size"] == 64
    assert manifest["storage_dtype"] == "float32"
    assert manifest["num_docs"] == 120
    assert manifest["num_tokens"] == table.num_rows == sum(manifest["doc_tokens"])
    assert manifest["source"]["dataset"] == shards.dataset
    assert manifest["max_seq_length"] == 64
    assert manifest["exclude_first_token"] is True and manifest["outlier_norm_factor"] == 0.0
    assert manifest["outlier_tokens_dropped"] == 0
    assert len(manifest["shards"]) == 6
    assert manifest["layer_cut"] == "blocks"  # the model cut after its blocks (all of them, for -1)


@pytest.mark.integration
def test_a_middle_layer_of_a_model_that_cannot_be_cut_is_extracted_from_its_hidden_states(ray_cluster, assets, tmp_path):
    # OPT's project_out follows the final norm: no cut gives a middle layer, the whole model's hidden_states[2] does.
    from transformers import OPTConfig, OPTForCausalLM

    from trm_ray.quickstart import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=16, pad_token_id=0)).eval()
    model.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    cfg = make_config({"model_name": str(tmp_path / "opt"), "dataset": assets["corpus"], "num_samples": 12, "max_seq_length": 32,
                       "docs_per_shard": 6, "layer": 2, "shards_dir": str(tmp_path / "shards"), "output_dir": str(tmp_path)})
    manifest, table = extract(cfg), read_rows(cfg)[1]
    assert manifest["layer_cut"] == "hidden_states" and manifest["hidden_size"] == 32
    ids = tokenizer(read_documents(cfg)[3], truncation=True, max_length=32)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
    rows = torch.from_numpy(table["doc_id"].to_numpy() == 3)
    torch.testing.assert_close(decode_hidden(table["hidden"])[rows], expected[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_values_beyond_float16_range_are_stored_without_overflow(tmp_path, storage_dtype):
    hidden = torch.tensor([[70000.0, -1.5e5, 3.0, 0.0], [1e6, 65504.0, -70000.0, 2.5]])
    table = shard_table(hidden, np.array([0, 0]), np.array([0, 1]), np.array([5, 6]), storage_dtype)
    pq.write_table(table, tmp_path / "s.parquet")
    back = decode_hidden(pq.read_table(tmp_path / "s.parquet")["hidden"])
    assert torch.isfinite(back).all()
    expected = hidden if storage_dtype == "float32" else hidden.to(torch.bfloat16).float()
    assert torch.equal(back, expected)
    assert back[1, 0] > 9e5


def test_nonfinite_hidden_states_are_refused():
    with pytest.raises(Exception, match="NaN/Inf"):
        shard_table(torch.tensor([[1.0, float("nan")]]), np.array([0]), np.array([0]), np.array([1]), "float32")


@pytest.mark.integration
def test_existing_shards_are_reused_not_re_extracted(shards, monkeypatch):
    monkeypatch.setattr(extract_mod, "read_documents", lambda cfg: pytest.fail("re-read the corpus"))
    assert extract(shards)["num_tokens"] == read_manifest(shards.shards_path)["num_tokens"]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract_mod.main(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.integration
def test_missing_model_path_is_a_one_line_error(ray_cluster, assets, tmp_path, capsys):
    code, err = run_cli(["--model_name", str(tmp_path / "no-such-model"), "--dataset", assets["corpus"],
                         "--shards_dir", str(tmp_path / "s")], capsys)
    assert code == 2
    assert err.count("\n") == 0 and "does not exist" in err and "no-such-model" in err
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.integration
def test_empty_corpus_is_a_one_line_error_and_leaves_no_manifest(ray_cluster, assets, tmp_path, capsys):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text(json.dumps({"text": "   "}) + "\n")
    code, err = run_cli(["--model_name", assets["model"], "--dataset", str(corpus), "--shards_dir", str(tmp_path / "s")], capsys)
    assert code == 2
    assert err.startswith("error: ") and "no non-empty" in err and err.count("\n") == 0
    assert not os.path.exists(tmp_path / "s" / "manifest.json")


def test_use_gpu_requests_a_gpu_per_replica_even_while_the_cluster_has_none():
    cfg = make_config({"use_gpu": True})
    # An autoscaling cluster before its first GPU worker: the request is what makes it add one.
    assert placement(cfg, cluster_gpus=0, node_cpus=8, cluster_cpus=8) == Placement(replicas=1, num_gpus=1, num_cpus=1)
    assert placement(cfg, cluster_gpus=4, node_cpus=8, cluster_cpus=32).replicas == 4
    assert placement(make_config({"use_gpu": True, "num_extract_workers": 8}), 0, 8, 8).replicas == 8
    assert resolve_storage_dtype(cfg) == "bfloat16"


def test_without_use_gpu_extraction_stays_on_cpu_with_a_nodes_cpus_even_on_a_gpu_cluster():
    cfg = make_config({})
    assert placement(cfg, cluster_gpus=4, node_cpus=16, cluster_cpus=64) == Placement(replicas=1, num_gpus=0, num_cpus=16)
    assert placement(make_config({"num_extract_workers": 4}), 0, 16, 32).num_cpus == 8
    assert resolve_storage_dtype(cfg) == "float32"
    assert resolve_storage_dtype(make_config({"use_gpu": True, "storage_dtype": "float32"})) == "float32"


def test_a_3b_model_on_cpu_is_announced_as_days_before_extraction_starts(tmp_path, capsys):
    from transformers import SmolLM3Config

    SmolLM3Config(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=4).save_pretrained(tmp_path)
    cfg = make_config({"model_name": str(tmp_path)})
    extract_mod.announce(cfg, placement(cfg, 0, 16, 16), 0, max_tokens=50000 * 512)
    out = capsys.readouterr().out
    assert "5.62 GFLOP/token" in out and "days" in out and "--use_gpu" in out

    gpu = make_config({"model_name": str(tmp_path), "use_gpu": True})
    extract_mod.announce(gpu, placement(gpu, 0, 16, 16), 0, max_tokens=50000 * 512)
    assert "1 GPU each" in capsys.readouterr().out
