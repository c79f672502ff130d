"""Train compressors for one D' or a grid of them: shards -> Ray Tune (ASHA) -> a TorchTrainer per trial -> export.

    python -m trm_ray.sweep --config tune_configs/quickstart.yaml
    python -m trm_ray.sweep --sweep --sweep_d_values 128 256 512
    python -m trm_ray.sweep --d_compressed 256          # one D', same trainer

Hidden states are extracted first when the shards are missing. At the end the best
checkpoint of each D' is copied to the seed's layout (`<output_dir>/d<D'>/stage1a_best.pt`,
or `<output_dir>/stage1a_best.pt` for a single run) and summarised in
`<output_dir>/sweep_results.json`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import uuid
from typing import Any

from trm_ray.compressor import load_checkpoint
from trm_ray.config import Config, UserError, build_parser, config_from_args
from trm_ray.extract import extract, hidden_size_of
from trm_ray.report import export_path, export_results, print_table
from trm_ray.shards import absolute, load_splits, split_counts
from trm_ray.tracking import prepare_wandb
from trm_ray.train import CHECKPOINT_FILE, make_trainer, trial_config


def trial(config: dict[str, Any], train: Any, val: Any) -> None:
    """One Tune trial: a TorchTrainer (Train V2) whose reports reach Tune through TuneReportCallback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg, _ = trial_config(config)
    config = {**config, "init_checkpoint": init_checkpoint(cfg, cfg.d_compressed)}
    make_trainer(config, train, val, callbacks=[TuneReportCallback()]).fit()


def init_checkpoint(cfg: Config, d_compressed: int) -> str | None:
    """Stage 1b starts from the stage 1a checkpoint of the same D'; stage 1a from scratch."""
    if cfg.stage == "1a":
        return None
    return cfg.compressor_checkpoint or export_path(cfg, d_compressed, stage="1a")


def datasets(cfg: Config, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """Train/val datasets, held in the object store when they fit.

    Re-reading and re-filtering small shards costs seconds of Ray Data start-up every epoch;
    materialized once here, every trial and epoch shares the same blocks.
    """
    import ray

    train, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    value_bytes = 2 if manifest["storage_dtype"] == "bfloat16" else 4
    size = manifest["num_tokens"] * manifest["hidden_size"] * value_bytes
    budget = ray.available_resources().get("object_store_memory", 0) * 0.5
    if cfg.cache_datasets == "always" or (cfg.cache_datasets == "auto" and size < budget):
        print(f"sweep: holding {size / 2**20:,.1f} MiB of shards in the object store", flush=True)
        return train.materialize(), val.materialize()
    return train, val


def prepare(cfg: Config) -> tuple[dict[str, Any], dict[str, int]]:
    """Shards (extracted now if missing), checked against the model and the D' values."""
    d_model = hidden_size_of(cfg.model_name)
    for d in cfg.d_values:
        if not 0 < d < d_model:
            raise UserError(f"D' = {d} is not in 1..{d_model - 1}: {cfg.model_name} has hidden size D = {d_model}")
    for d in cfg.d_values:  # before any extraction: a 1b run never silently starts from scratch
        path = init_checkpoint(cfg, d)
        if path and not os.path.exists(path):
            raise UserError(f"stage 1b starts from a stage 1a checkpoint, and {path} does not exist: "
                            "run stage 1a first, or pass --compressor_checkpoint")
        if path:
            load_checkpoint(path, d_model=d_model, d_compressed=d)
    manifest = extract(cfg)
    return manifest, split_counts(manifest, cfg.val_fraction, cfg.seed)


def trial_config_for(cfg: Config, manifest: dict[str, Any], counts: dict[str, int], train_storage: str,
                     group: str = "") -> dict[str, Any]:
    """What a trial's training loop gets: every Config field plus facts derived from the shards."""
    return {**dataclasses.asdict(cfg), "d_model": manifest["hidden_size"], "train_tokens": counts["train_tokens"],
            "train_storage": train_storage, "group": group, "init_checkpoint": init_checkpoint(cfg, cfg.d_compressed)}


def run(cfg: Config, overwrite: bool = False) -> list[dict[str, Any]]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg = dataclasses.replace(cfg, shards_dir=absolute(cfg.shards_path), output_dir=absolute(cfg.output_dir))
    manifest, counts = prepare(cfg)
    d_model = manifest["hidden_size"]
    print(f"sweep: D={d_model}, D' in {cfg.d_values}; {counts['train_tokens']:,} train tokens "
          f"({counts['train_docs']} docs), {counts['val_tokens']:,} validation tokens ({counts['val_docs']} docs)",
          flush=True)

    name = f"stage{cfg.stage}_{'sweep' if cfg.sweep else f'd{cfg.d_compressed}'}"
    storage = os.path.join(cfg.output_dir, "ray_results")
    for path in (os.path.join(storage, name), os.path.join(storage, f"{name}_train")):
        if os.path.exists(path):
            if not overwrite:
                raise UserError(f"{path} holds an earlier run's results: pass --overwrite to replace them, or choose another --output_dir")
            shutil.rmtree(path)

    # The W&B group: unique per sweep, fixed for its lifetime (it is part of the restored Tune state).
    group = f"{name}-{uuid.uuid4().hex[:8]}"
    param_space = {**trial_config_for(cfg, manifest, counts, os.path.join(storage, f"{name}_train"), group),
                   "d_compressed": tune.grid_search(cfg.d_values)}
    scheduler = ASHAScheduler(
        time_attr="training_iteration", metric="cosine_similarity", mode="max", max_t=cfg.num_epochs,
        grace_period=min(cfg.grace_period, cfg.num_epochs),
        stop_last_trials=False,  # the default kills the survivors at max_t before they finish cleanly
    )
    train, val = datasets(cfg, manifest)
    tuner = tune.Tuner(
        tune.with_parameters(trial, train=train, val=val),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials,
            trial_name_creator=lambda t: f"d{t.config['d_compressed']}",
            trial_dirname_creator=lambda t: f"d{t.config['d_compressed']}",
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
    )
    grid = tuner.fit()
    rows = export_results(grid, cfg, d_model, CHECKPOINT_FILE)
    print_table(rows, cfg)
    return rows


def main(argv: list[str] | None = None) -> None:
    from trm_ray.cli import connect, run_cli

    parser = build_parser("python -m trm_ray.sweep", __doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier run's results in --output_dir.")

    def main_() -> None:
        args = parser.parse_args(argv)
        cfg = config_from_args(args)
        prepare_wandb(cfg)
        connect(cfg)
        rows = run(cfg, overwrite=args.overwrite)
        if any("error" in row for row in rows):
            sys.exit(1)

    run_cli(main_)


if __name__ == "__main__":
    main(sys.argv[1:])
