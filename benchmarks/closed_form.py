"""Stage 1a's MSE sweep on real hidden states: the closed form (the default) against SGD from the same PCA start.

Both run trm_ray.sweep.run on the same shards of a pretrained LM's last layer (SmolLM2-135M-Instruct
over real English, benchmarks.real_model; the extraction and the spectrum are shared and cached):
the default, which exports PCA with the spectrum pass's validation metrics, and `--no_closed_form`,
which trains every D' from that start as the sweep did before (Tune, early stopping, the export).
Reported: each one's wall time after extraction, the bytes it read from the shards (the spectrum's
pass over all of them, the downstream pass's over the validation rows; an SGD sweep's initial
validation and, each epoch, the training and the validation rows once more), and the largest difference between their rows' metrics.

    python -m benchmarks.closed_form            # SmolLM2-135M, 400 documents x 256 tokens, D' 8..288
"""

from __future__ import annotations

import dataclasses
import os
import time

from benchmarks.common import machine, print_ratio
from benchmarks.quality import REAL
from trm_ray import spectrum, sweep
from trm_ray.names import spectrum_files
from trm_ray.cluster import connect
from trm_ray.names import METRICS
from trm_ray.config import make_config
from trm_ray.shards import shard_paths, split_counts


def main(argv: list[str] | None = None) -> dict[str, float]:
    from benchmarks.real_model import CACHE, english_corpus, pretrained_lm_dir
    from trm_ray.extract import extract

    load = os.getloadavg()[0]
    work_dir = str(CACHE / "quality_real")  # benchmarks.quality --real's extraction: the same settings
    cfg = make_config(REAL | dict(model_name=pretrained_lm_dir(), output_dir=work_dir, sweep=True, num_cpus=8,
                                  dataset=english_corpus(os.path.join(work_dir, "corpus.jsonl"), REAL["num_samples"]),
                                  use_wandb=False, torch_compile=False))
    connect(cfg)
    manifest = extract(cfg)
    for path in spectrum_files(cfg.shards_path, cfg.val_fraction, cfg.seed):  # its pass is timed here
        if os.path.exists(path):
            os.remove(path)
    t0 = time.perf_counter()
    spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed)
    spectrum_s = time.perf_counter() - t0
    shard_bytes = sum(os.path.getsize(p) for p in shard_paths(cfg.shards_path, manifest))
    val_share = split_counts(manifest, cfg.val_fraction, cfg.seed)["val_tokens"] / manifest["num_tokens"]
    runs = {}
    for name, closed in (("closed_form", True), ("sgd", False)):
        run_cfg = dataclasses.replace(cfg, closed_form=closed, shards_dir=cfg.shards_path,
                                      output_dir=os.path.join(work_dir, f"sweep_{name}"))
        t0 = time.perf_counter()
        rows = sweep.run(run_cfg, overwrite=True)
        epochs = max(r["epochs_trained"] for r in rows)  # one trial reads every batch once for all its D'
        # The spectrum's pass and the downstream pass's validation rows; SGD's initial validation and its epochs.
        read = shard_bytes * (1 + val_share + (0 if closed else val_share + epochs))
        runs[name] = {"rows": rows, "wall": time.perf_counter() - t0 + spectrum_s, "read": read, "epochs": epochs}
    cf, sgd = runs["closed_form"], runs["sgd"]
    diff = max(abs(a[k] - b[k]) for a, b in zip(cf["rows"], sgd["rows"]) for k in (*METRICS, "pca_efficiency"))
    print(f"closed_form: {os.path.basename(cfg.model_name)} last layer, D={manifest['hidden_size']}, "
          f"{manifest['num_tokens']:,} tokens in {shard_bytes / 2**20:,.1f} MiB of shards, D' in {cfg.d_values}")
    print(machine(load))
    print(f"after extraction: closed form {cf['wall']:.1f}s, {cf['read'] / 2**20:,.1f} MiB read | SGD from PCA "
          f"{sgd['wall']:.1f}s, {sgd['read'] / 2**20:,.1f} MiB read ({sgd['epochs']} epochs) | the spectrum's pass "
          f"{spectrum_s:.1f}s of each")
    print(f"{'D_prime':>8} {'cf_pca_eff':>11} {'sgd_pca_eff':>12} {'cf_c_cos':>9} {'sgd_c_cos':>10} {'sgd_epochs':>11}")
    for a, b in zip(cf["rows"], sgd["rows"]):
        print(f"{a['d_compressed']:>8} {a['pca_efficiency']:>11.6f} {b['pca_efficiency']:>12.6f} "
              f"{a['centred_cosine_similarity']:>9.6f} {b['centred_cosine_similarity']:>10.6f} {b['epochs_trained']:>11}")
    print(f"largest difference of a row's metric between the two: {diff:.2g}")
    return {"wall_closed_form/sgd": print_ratio("wall_closed_form/sgd", cf["wall"], sgd["wall"], "s"),
            "read_closed_form/sgd": print_ratio("read_closed_form/sgd", cf["read"], sgd["read"], "bytes")}


if __name__ == "__main__":
    main()
