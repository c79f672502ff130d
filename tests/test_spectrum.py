import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from trm_ray import spectrum, sweep
from trm_ray.names import spectrum_files
from trm_ray.references import eigenvectors
from trm_ray.compressor import DimensionCompressor
from trm_ray.files import read_json, write_json
from trm_ray.hidden import decode_hidden, validation_rows
from trm_ray.train import load_splits
from trm_ray.train import initial_model


def rows_of(ds) -> np.ndarray:
    return np.concatenate([decode_hidden(b["hidden"]).double().numpy() for b in ds.iter_batches(batch_format="pyarrow")])


@pytest.fixture(scope="session")
def limit(shards):
    return spectrum.load_or_compute(shards.shards_path, shards.val_fraction, shards.seed)


@pytest.mark.integration
def test_spectrum_matches_numpy_eigh_on_the_same_rows(shards, limit):
    train, val = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    x, v = rows_of(train), rows_of(val)
    evals, evecs = np.linalg.eigh(x.T @ x)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    np.testing.assert_allclose(limit["eigenvalues"], evals / len(x), rtol=1e-8, atol=1e-12)
    for d in (1, 8, 16, 32, 63):
        top = evecs[:, :d]
        rec = v @ top @ top.T
        assert limit["pca_mse"][d] == pytest.approx(((v - rec) ** 2).mean(), rel=1e-8)
        cos = (rec * v).sum(1) / np.linalg.norm(rec, axis=1) / np.linalg.norm(v, axis=1)
        assert limit["pca_cosine_similarity"][d] == pytest.approx(cos.mean(), rel=1e-8)
        assert limit["explained_variance"][d] == pytest.approx(evals[:d].sum() / evals.sum(), rel=1e-8)
        assert limit["train_pca_mse"][d] == pytest.approx(((x - x @ top @ top.T) ** 2).mean(), rel=1e-6)


@pytest.mark.integration
def test_pca_explained_variance_is_the_validation_rows_like_the_trained_compressors(shards, limit):
    train, val = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    x, v = rows_of(train), rows_of(val)
    top_all = np.linalg.eigh(x.T @ x)[1][:, ::-1]
    for d in (1, 8, 16, 32, 63):
        top = top_all[:, :d]
        err = ((v - v @ top @ top.T) ** 2).sum()
        assert limit["pca_explained_variance"][d] == pytest.approx(1 - err / (v ** 2).sum(), rel=1e-8)


@pytest.mark.integration
def test_pca_centred_references_are_about_the_training_mean(shards, limit):
    train, val = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    x, v = rows_of(train), rows_of(val)
    mu = x.mean(0)
    np.testing.assert_allclose(limit["mean"], mu, rtol=1e-10, atol=1e-12)
    top_all = np.linalg.eigh(x.T @ x)[1][:, ::-1]
    for d in (0, 1, 8, 16, 32, 63, 64):
        top = top_all[:, :d]
        rec = v @ top @ top.T
        assert limit["pca_centred_explained_variance"][d] == pytest.approx(
            1 - ((v - rec) ** 2).sum() / ((v - mu) ** 2).sum(), rel=1e-8, abs=1e-10)
        rc, vc = rec - mu, v - mu
        cos = (rc * vc).sum(1) / np.linalg.norm(rc, axis=1) / np.linalg.norm(vc, axis=1)
        assert limit["pca_centred_cosine_similarity"][d] == pytest.approx(cos.mean(), rel=1e-8)
        if 0 < d < 64:  # the common part of the rows flatters the uncentred references
            assert limit["pca_centred_explained_variance"][d] < limit["pca_explained_variance"][d]
            assert limit["pca_centred_cosine_similarity"][d] < limit["pca_cosine_similarity"][d]


@pytest.mark.integration
def test_a_spectrum_stored_without_the_centred_references_is_computed_again(shards, limit, tmp_path):
    copy = str(tmp_path / "shards")  # the session's spectrum stays as it is
    shutil.copytree(shards.shards_path, copy)
    json_path, _ = spectrum_files(copy, shards.val_fraction, shards.seed)
    write_json(json_path, {k: v for k, v in limit.items() if "centred" not in k})  # what a pass before them wrote
    again = spectrum.load_or_compute(copy, shards.val_fraction, shards.seed)
    assert again["pca_centred_cosine_similarity"] == pytest.approx(limit["pca_centred_cosine_similarity"], rel=1e-9)
    assert read_json(json_path) == again


@pytest.mark.integration
def test_spectrum_is_stored_beside_the_shards_and_reused(shards, limit, monkeypatch):
    monkeypatch.setattr(spectrum, "compute_spectrum", lambda *a: pytest.fail("recomputed"))
    assert spectrum.load_or_compute(shards.shards_path, shards.val_fraction, shards.seed) == limit


@pytest.mark.integration
def test_pca_init_starts_from_the_top_eigenvectors(shards, limit):
    train, _ = load_splits(shards.shards_path, shards.val_fraction, shards.seed)
    x = rows_of(train)
    _, evecs = np.linalg.eigh(x.T @ x)
    top = evecs[:, ::-1][:, :16]
    cfg = dataclasses.replace(shards, init="pca", d_compressed=16, sweep=False)
    model = initial_model(cfg, 64)
    w = model.weight.detach().double().numpy()
    np.testing.assert_allclose(w @ w.T, np.eye(16), atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose(w.T @ w, top @ top.T, atol=1e-5)  # spanning the top-16 subspace


@pytest.mark.integration
def test_downstream_kl_and_top1_agreement_match_a_direct_computation_on_the_whole_validation_set(swept):
    cfg, rows = swept
    lm = AutoModelForCausalLM.from_pretrained(cfg.model_name).eval()
    hidden, targets = validation_rows(cfg.shards_path, cfg.val_fraction, cfg.seed)  # all of it: what trials are selected on
    _, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    assert hidden.shape[0] == val.count()
    for r in rows:
        comp = DimensionCompressor.from_checkpoint(r["checkpoint"]).eval()
        with torch.no_grad():
            logp = torch.log_softmax(lm.lm_head(hidden), -1)
            logq = torch.log_softmax(lm.lm_head(comp(hidden)), -1)
        kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="batchmean")
        assert r["downstream_kl"] == pytest.approx(float(kl), rel=1e-4)
        known = targets >= 0
        ce = torch.nn.functional.cross_entropy
        increase = ce(logq[known], targets[known]) - ce(logp[known], targets[known])
        assert r["ce_increase"] == pytest.approx(float(increase), rel=1e-3, abs=1e-6)
        agree = float((logq.argmax(-1) == logp.argmax(-1)).double().mean())
        assert r["top1_agreement"] == pytest.approx(agree, abs=1e-12)
        top = eigenvectors(cfg.shards_path, cfg.val_fraction, cfg.seed)[:, :r["d_compressed"]].float()
        with torch.no_grad():
            pca_top1 = lm.lm_head(hidden @ top @ top.T).argmax(-1)
        assert r["pca_top1_agreement"] == pytest.approx(float((pca_top1 == logp.argmax(-1)).double().mean()), abs=1e-12)
        assert r["pca_downstream_kl"] > 0 and r["downstream_kl"] > 0
    assert [r["downstream_kl"] for r in rows] == sorted((r["downstream_kl"] for r in rows), reverse=True)


@pytest.mark.integration
def test_sweep_rows_carry_the_pca_limit_and_its_efficiency(swept, limit):
    _, rows = swept
    for r in rows:
        d = r["d_compressed"]
        assert r["pca_mse"] == pytest.approx(limit["pca_mse"][d])
        assert r["pca_efficiency"] == pytest.approx(r["pca_mse"] / r["mse"])
        assert r["pca_cosine_similarity"] == pytest.approx(limit["pca_cosine_similarity"][d])
        assert r["explained_variance"] <= r["pca_explained_variance"] + 1e-3
        for k in ("centred_cosine_similarity", "centred_explained_variance"):
            assert r[f"pca_{k}"] == pytest.approx(limit[f"pca_{k}"][d])
        assert r["centred_explained_variance"] <= r["pca_centred_explained_variance"] + 1e-3


@pytest.mark.integration
def test_asha_keeps_every_d_prime_and_stops_the_slow_learning_rates(shards, tmp_path):
    cfg = dataclasses.replace(shards, output_dir=str(tmp_path), shards_dir=shards.shards_path, sweep_d_values=[8, 32],
                              sweep_learning_rates=[0.05, 0.0001], num_epochs=2, grace_period=1, early_stopping=False,
                              init="orthogonal",  # from the PCA start every learning rate would be at the limit already
                              max_concurrent_trials=1, use_wandb=False, torch_compile=False, downstream=False)
    rows = sweep.run(cfg)
    assert [(r["d_compressed"], r["learning_rate"], r["epochs_trained"]) for r in rows] == [(8, 0.05, 2), (32, 0.05, 2)]
    # A trial per learning rate, with both widths: lr 0.0001's two were each stopped at the first milestone (after
    # one epoch), where lr 0.05 had done better, and the trial ended there.
    trials = {p.parent.name: pd.read_csv(p) for p in (tmp_path / "ray_results" / "stage1a_sweep").glob("lr*/progress.csv")}
    assert sorted(trials) == ["lr0.0001", "lr0.05"]
    assert [trials["lr0.05"][f"d{d}/epochs_trained"].max() for d in (8, 32)] == [2, 2]
    assert [trials["lr0.0001"][f"d{d}/epochs_trained"].max() for d in (8, 32)] == [1, 1]
    assert len(trials["lr0.0001"]) == 1
