import dataclasses
import glob
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trm_ray import downstream, phase2, sweep
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import UserError
from trm_ray.extract import extract
from trm_ray.hidden import decode_hidden
from trm_ray.shards import is_validation_doc, read_manifest, shard_paths
from trm_ray.train import load_splits
from trm_ray.references import start_path, training_mean
from trm_ray.text import REGIONS, chat_settings, read_documents
from trm_ray.loop import evaluate
from trm_ray.spec import config_of
from trm_ray.train import hidden_batches, initial_model


@pytest.mark.integration
def test_stage_1b_exports_beside_stage_1a(stage1b):
    cfg, rows, rows_1a = stage1b
    assert [r["d_compressed"] for r in rows] == [8, 16]
    for r, r_1a in zip(rows, rows_1a):
        assert r["checkpoint"] == r_1a["checkpoint"].replace("stage1a_best.pt", "stage1b_best.pt")


@pytest.mark.integration
def test_stage_1b_mse_starts_from_the_stage_1a_weights(stage1b):
    cfg, rows, rows_1a = stage1b
    # The weights the worker builds before its first step are the 1a checkpoint's.
    for d, r_1a in ((8, rows_1a[0]), (16, rows_1a[1])):
        model = initial_model(config_of({**sweep.dataclasses.asdict(cfg), "objective": "mse", "d_compressed": d}), 64)
        torch.testing.assert_close(model.weight, DimensionCompressor.from_checkpoint(r_1a["checkpoint"]).weight, rtol=0, atol=0)


@pytest.mark.integration
def test_phase2_starts_at_least_as_well_as_the_best_closed_form_on_the_training_rows_and_scores_it_first(stage1b):
    cfg, rows, rows_1a = stage1b
    assert cfg.objective == "phase2"  # stage 1b's default on phase 2's shards
    manifest = read_manifest(cfg.shards_path)
    table = pq.read_table(shard_paths(cfg.shards_path, manifest))
    train = ~is_validation_doc(table["doc_id"].to_numpy(), cfg.val_fraction, cfg.seed)
    x, region = decode_hidden(table["hidden"]).double(), table["region"].to_numpy()
    context, close = x[train & (region == REGIONS.index("context"))], x[train & (region == REGIONS.index("close"))]
    head = AutoModelForCausalLM.from_pretrained(cfg.model_name).get_output_embeddings().weight.detach().double()
    sigma = {name: rows_.T @ rows_ / len(rows_) for name, rows_ in (("context", context), ("close", close))}

    def score(w: torch.Tensor, d: int) -> float:
        """phase2_score on the training rows, as the sweep chooses the start."""
        limit = float(torch.linalg.eigvalsh(sigma["context"]).flip(0)[d:].sum())
        residual = float(sigma["context"].trace() - (w @ sigma["context"] @ w.T).trace())
        top = torch.linalg.eigh(sigma["close"])[1][:, -d:]
        close_kl = [float(kl(head, close, close @ v @ v.T)) for v in (w.T, top)]
        return phase2.phase2_score(close_kl[0], close_kl[1], limit / residual)

    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    for d, r, r_1a in zip((8, 16), rows, rows_1a):
        model = initial_model(config_of({**sweep.dataclasses.asdict(cfg), "d_compressed": d}), 64)
        start = model.weight.detach().double()
        candidates = [DimensionCompressor.from_checkpoint(r_1a["checkpoint"]).weight.detach().double()]
        for lam in downstream.MIX_GRID:
            mixed = sigma["context"] / sigma["context"].trace() + lam * sigma["close"] / sigma["close"].trace()
            candidates.append(torch.linalg.eigh(mixed)[1][:, -d:].T)
        best = min(score(w, d) for w in candidates)
        # The best closed form, or that moved down the training loss where it then scores better still.
        assert score(start, d) <= best * (1 + 1e-3)
        torch.testing.assert_close(start @ start.T, torch.eye(d, dtype=start.dtype), atol=1e-5, rtol=0)
        # The run's first report scored exactly those weights on the 1b validation set.
        scored = evaluate([model], hidden_batches(val, 512, torch.device("cpu")), training_mean(cfg.shards_path, cfg.val_fraction, cfg.seed))[0]
        assert r["initial_cosine_similarity"] == pytest.approx(scored["cosine_similarity"], abs=1e-6)


@pytest.mark.integration
def test_phase2_reports_each_regions_scores_every_epoch_and_selects_on_phase2_score(stage1b):
    cfg, rows, _ = stage1b
    reports = [json.loads(line) for line in open(glob.glob(f"{cfg.output_dir}/ray_results/stage1b_sweep/lr*/result.json")[0])]
    assert [r["epoch"] for r in reports] == [1, 2]
    for d, row in zip((8, 16), rows):
        for r in reports:
            m = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(f"d{d}/")}
            assert m["context_pca_efficiency"] == pytest.approx(m["context_pca_mse"] / m["context_mse"])
            assert m["phase2_score"] == pytest.approx(
                phase2.phase2_score(m["close_downstream_kl"], m["close_pca_downstream_kl"], m["context_pca_efficiency"]))
            assert 0 <= m["close_top1_agreement"] <= 1 and m["close_tokens"] > 0
        epochs = {0: reports[0][f"d{d}/initial_phase2_score"], **{r["epoch"]: r[f"d{d}/phase2_score"] for r in reports}}
        assert row["best_epoch"] == min(epochs, key=epochs.get)
        assert row["phase2_score"] == pytest.approx(epochs[row["best_epoch"]])


@pytest.mark.integration
def test_phase2_references_and_starts_computed_a_d_prime_a_task_equal_one_tasks(stage1b):
    cfg, _, _ = stage1b
    report = json.loads(open(glob.glob(f"{cfg.output_dir}/ray_results/stage1b_sweep/lr*/result.json")[0]).readline())
    split_starts = torch.load(start_path(cfg.output_dir), weights_only=True)  # the sweep's: D' 8 and 16 each a task
    starts, references = downstream.references_and_starts(
        cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, [8, 16], {d: cfg.init_checkpoint(d) for d in (8, 16)},
        cfg.close_weight)
    for d in (8, 16):
        torch.testing.assert_close(starts[d], split_starts[d], rtol=0, atol=1e-5)
        for key in ("context_pca_mse", "close_pca_downstream_kl"):  # what every epoch was scored against
            assert references[key][str(d)] == pytest.approx(report[f"d{d}/{key}"], rel=1e-6), key


def kl(head: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean KL(p(x) || p(x_hat)) of the LM head (float64)."""
    logp, logq = torch.log_softmax(x @ head.T, -1), torch.log_softmax(x_hat @ head.T, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@pytest.mark.integration
def test_thinking_shards_hold_only_the_thinking_span_and_record_it_as_reasoning(stage1b, tmp_path):
    cfg, _, _ = stage1b
    cfg = dataclasses.replace(cfg, keep_tokens="thinking", objective="mse", shards_dir=str(tmp_path / "thinking"))
    extract(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
    manifest = read_manifest(cfg.shards_path)
    assert manifest["stage"] == "1b" and manifest["keep_tokens"] == "thinking" and manifest["regions"] == list(REGIONS)
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
    assert set(table["region"].to_numpy().tolist()) == {REGIONS.index("reasoning")}
    specials = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<|im_start|>", "<|im_end|>"]))
    assert specials.isdisjoint(np.unique(table["token_id"].to_numpy()).tolist())


@pytest.mark.integration
def test_phase2_shards_record_each_rows_region(stage1b):
    cfg, _, _ = stage1b
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
    manifest = read_manifest(cfg.shards_path)
    assert manifest["keep_tokens"] == "phase2" and manifest["regions"] == list(REGIONS)
    assert manifest["exclude_first_token"] is False  # phase2's default: the first token is kept
    table = pq.read_table(shard_paths(cfg.shards_path, manifest)[0])
    docs = read_documents(cfg)
    close_id = tokenizer.convert_tokens_to_ids("</think>")
    for doc in (0, 5, 39):
        rows = table.filter(pa.compute.equal(table["doc_id"], doc))
        region, tokens = rows["region"].to_numpy(), rows["token_id"].to_numpy()
        # The rendered conversation up to the assistant's <think>, its first token too (phase 2 compresses it).
        render = tokenizer.apply_chat_template(docs[doc], tokenize=False, enable_thinking=True)
        context = tokenizer(render.split("<think>")[0], add_special_tokens=False)["input_ids"]
        assert tokens[region == REGIONS.index("context")].tolist() == context
        assert tokens[region == REGIONS.index("close")].tolist() == [close_id]
        full = tokenizer(render, add_special_tokens=False)["input_ids"]
        assert rows["position"].to_numpy()[region == REGIONS.index("close")].tolist() == [full.index(close_id)]
        assert len(tokens) == len(context) + 1  # nothing of the reasoning or the answer


@pytest.mark.integration
def test_stage_1b_rows_carry_per_region_metrics_equal_to_a_direct_computation(stage1b):
    cfg, rows, _ = stage1b
    manifest = read_manifest(cfg.shards_path)
    table = pq.read_table(shard_paths(cfg.shards_path, manifest))
    val = is_validation_doc(table["doc_id"].to_numpy(), cfg.val_fraction, cfg.seed)
    x, region = decode_hidden(table["hidden"]).double(), table["region"].to_numpy()
    head = AutoModelForCausalLM.from_pretrained(cfg.model_name).get_output_embeddings().weight.detach().double()
    for row in rows:
        w = DimensionCompressor.from_checkpoint(row["checkpoint"]).weight.detach().double()
        for name in ("context", "close"):
            train, held_out = x[~val & (region == REGIONS.index(name))], x[val & (region == REGIONS.index(name))]
            rec = held_out @ w.T @ w
            mse = float(((rec - held_out) ** 2).mean())
            top = torch.linalg.eigh(train.T @ train)[1][:, -row["d_compressed"]:]  # the region's own PCA limit
            pca_mse = float(((held_out @ top @ top.T - held_out) ** 2).mean())
            assert row[f"{name}_tokens"] == len(held_out) > 0
            assert row[f"{name}_mse"] == pytest.approx(mse, rel=1e-4)
            assert row[f"{name}_cosine_similarity"] == pytest.approx(
                float(torch.nn.functional.cosine_similarity(rec, held_out).mean()), rel=1e-5)
            assert row[f"{name}_pca_mse"] == pytest.approx(pca_mse, rel=1e-4)
            assert row[f"{name}_pca_efficiency"] == pytest.approx(pca_mse / mse, rel=2e-4)
        # At the closing state: the LM head on the reconstruction against the head on the original.
        logp, logq = torch.log_softmax(held_out @ head.T, -1), torch.log_softmax(rec @ head.T, -1)
        assert row["close_downstream_kl"] == pytest.approx(float((logp.exp() * (logp - logq)).sum(-1).mean()), rel=1e-3, abs=1e-7)
        assert row["close_top1_agreement"] == pytest.approx(float((logp.argmax(-1) == logq.argmax(-1)).double().mean()))
        assert row["close_pca_downstream_kl"] > 0 and 0 <= row["close_pca_top1_agreement"] <= 1


@pytest.mark.integration
def test_stage_1b_without_a_stage_1a_checkpoint_is_refused(stage1b, tmp_path):
    cfg, _, _ = stage1b
    with pytest.raises(UserError, match="stage1a_best.pt does not exist: run stage 1a first"):
        sweep.check_starts(sweep.dataclasses.replace(cfg, output_dir=str(tmp_path)))


@pytest.mark.integration
def test_stage_1b_from_a_checkpoint_of_another_d_prime_names_both_shapes(stage1b, swept):
    cfg, _, rows_1a = stage1b
    wrong = sweep.dataclasses.replace(cfg, sweep=False, d_compressed=16, compressor_checkpoint=rows_1a[0]["checkpoint"])
    with pytest.raises(UserError, match="D'xD = 8x64, but this run needs 16x64"):
        sweep.check_starts(wrong)
