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
import glob
import os
import shlex
import shutil
import sys
import threading
import uuid
from typing import Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from trm_ray import spectrum
from trm_ray.cluster import most_resources, trial_resources
from trm_ray.compressor import load_checkpoint
from trm_ray.config import FIELDS, Config, UserError, build_parser, config_from_args, make_config
from trm_ray.downstream import FISHER_TOKENS, check_head, fisher_start, pca_kl, references_and_start
from trm_ray.extract import check_before_ray, extract
from trm_ray.files import absolute, read_json, write_json
from trm_ray.model import hidden_size_of, model_id
from trm_ray.names import CHECKPOINT_FILE, LOWER_IS_BETTER
from trm_ray.references import start_path, store, stored, stored_json
from trm_ray.regions import print_regions
from trm_ray.report import exclusions, export_closed_form, export_results, plot_report, print_table, save_rows
from trm_ray.scheduler import PerWidthASHA
from trm_ray.scoring import FAILURES, score
from trm_ray.shards import split_counts, value_bytes, verify_shards
from trm_ray.spec import REFERENCES, TrialSpec, config_of
from trm_ray.tracking import prepare_wandb
from trm_ray.train import load_splits, make_trainer


class ReportToTune(UserCallback):
    """Runs in a trial's Train controller: hands each report (and its checkpoint's path) to the trial.

    Ray's TuneReportCallback does the same through a queue that the trial polls with a 0.2 s
    timeout, and every poll of the empty queue ends in an exception inside the queue's actor:
    the dashboard counted those, ~2.5 a second per running trial, as failed tasks of a sweep
    that succeeded. Here the trial waits on the queue without a timeout (see `trial`)."""

    def __init__(self, reports: Any):
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.reports.put({**metrics[0], **({CHECKPOINT_PATH_KEY: checkpoint.path} if checkpoint else {})})


def trial(config: dict[str, Any], train: Any, val: Any, runtime: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer (Train V2) fits in a thread while this one reports to Tune
    what the controller hands over, until the fit ends; its error, if any, is the trial's.

    `runtime` (the RUNTIME_ONLY settings of the command that runs the sweep now) overrides the trial's
    config: a restored trial keeps the config it was saved with, but Tune takes the trainable, and
    with it these parameters, from the command that resumes it."""
    from ray import tune
    from ray.util.queue import Queue

    config = {**config, **runtime}
    reports, outcome = Queue(actor_options={"num_cpus": 0}), {}

    def fit() -> None:
        try:
            make_trainer(config, train, val, callbacks=[ReportToTune(reports)]).fit()
        except BaseException as e:  # raised again below, in Tune's thread
            outcome["error"] = e
        finally:
            reports.put(None)

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    while (metrics := reports.get()) is not None:
        tune.report(metrics)
    fitting.join()
    if "error" in outcome:
        raise outcome["error"]


SWEEP_CONFIG = "trm_ray_config.json"
# Settings that may change between an interrupted sweep and its resumption, and take effect then: the local
# Ray's CPUs, and what reaches the trials through `trial`'s runtime parameters. Not --max_concurrent_trials
# nor --max_failures: Tune restores its search's concurrency limit and each trial's retry budget as saved.
RUNTIME_ONLY = {"address", "num_cpus", "use_wandb"}


def differing_settings(saved: dict[str, Any], cfg: Config) -> list[str]:
    now = dataclasses.asdict(cfg)
    return sorted(k for k in now if k not in RUNTIME_ONLY and saved.get(k) != now[k])


def should_resume(exp_dir: str, cfg: Config, overwrite: bool) -> bool:
    """The same command again continues the sweep; another sweep's results are never mixed in.

    A directory without Tune state (a crash before Tune saved anything) holds nothing to lose: start afresh."""
    from ray import tune

    if overwrite or not os.path.exists(exp_dir) or not tune.Tuner.can_restore(exp_dir):
        return False
    changed = differing_settings(read_json(os.path.join(exp_dir, SWEEP_CONFIG)) or {}, cfg)
    if changed:
        raise UserError(f"{cfg.output_dir} holds another sweep's results ({', '.join(changed)} differ): "
                        "pass --overwrite to replace them, or choose another --output_dir")
    return True


def trials_that_fit(cfg: Config, total: dict[str, float], most: dict[str, float] | None = None) -> int | None:
    """On a Ray with `total` resources, whose autoscaler may grow it to `most` (None: no autoscaler is seen): how
    many trials run at once with their workers, counted on every resource a trial holds (CPUs, GPUs, ...; one CPU
    left for Ray Data's reads), on the cluster as large as it may grow.

    Tune starts a trial on its function's one CPU, and Train asks for the workers' resources only when
    it builds the worker group: past what fits, the Tune functions hold the CPUs that workers and Ray
    Data's reads wait for, and on a cluster, where Train waits for its workers without limit, that wait
    never ends. Capped here, the rest wait in Tune's queue and start as others finish; counted on the grown
    cluster, the trials waiting for their workers are what the autoscaler adds nodes for. A local Ray, or a
    cluster whose autoscaler cannot grow it enough, that cannot hold one trial is refused; a cluster whose
    autoscaler is not seen and cannot hold one now must grow for any trial (e.g. its GPU nodes start at none):
    None, its autoscaler adds nodes for what is pending."""
    need = trial_resources(cfg)
    size = {name: max(total.get(name, 0), (most or {}).get(name, 0)) for name in need}
    spare = {name: size[name] - (1 if name == "CPU" else 0) for name in need}
    if any(spare[name] < amount for name, amount in need.items()):
        if cfg.address and most is None:
            return None
        wants = ", ".join(f"{amount:g} {name}" for name, amount in sorted(need.items()))
        has = ", ".join(f"{size[name]:g} {name}" for name in sorted(need))
        where = ("this cluster's autoscaler grows it to at most" if most is not None else "the local Ray has")
        fix = ("pass fewer --num_workers, or raise the node types' max_workers in cluster.yaml" if most is not None else
               "pass --num_cpus, fewer --num_workers, or --no_use_gpu")
        raise UserError(f"a trial needs {wants} (its Tune function and {cfg.num_workers} worker(s)) and 1 more CPU for "
                        f"Ray Data; {where} {has}: {fix}")
    return min(int(spare[name] // amount) for name, amount in need.items() if amount > 0)


def usage(cfg: Config, total: dict[str, float], concurrent: int | None, most: dict[str, float] | None = None) -> list[str]:
    """What the sweep will hold, said before it starts: trials x workers x GPUs (or CPUs) each against what the
    Ray has now and what its autoscaler may grow it to (`most`), and a warning where GPUs would sit idle while
    it trains. A trial is one learning rate training every D' on --num_workers workers, which split its steps and
    its validation between them."""
    trials = len(cfg.sweep_learning_rates) or 1
    kind = "GPU" if cfg.use_gpu else "CPU"
    each = cfg.num_workers  # one GPU, or one logical CPU, a worker
    at_once = trials if concurrent is None else min(trials, concurrent, cfg.max_concurrent_trials or trials)
    now, grown = total.get(kind, 0), (most or {}).get(kind, 0)
    where = (f"of the {now:g} the Ray has now, {grown:g} once its autoscaler has added nodes" if grown > now else
             f"of the {now:g} the Ray has now")
    lines = [f"sweep: {trials} trial{'s' * (trials > 1)} (a learning rate each, every D' in each) x {cfg.num_workers} "
             f"worker{'s' * (cfg.num_workers > 1)} x 1 {kind} = {trials * each} {kind}s, "
             + (f"{at_once} trial{'s' * (at_once > 1)} at once ({at_once * each:g} {kind}s {where})" if concurrent is not None
                else f"none of which fits the Ray as it is now ({now:g} {kind}s): its autoscaler must add nodes")]
    have = max(total.get("GPU", 0), (most or {}).get("GPU", 0))
    busy = at_once * each if cfg.use_gpu and concurrent is not None else 0
    if have > busy:
        idle = int(have - busy)
        if not cfg.use_gpu:
            hint = "pass --use_gpu"
        else:
            workers = int(have // at_once)
            hint = (f"pass --num_workers {workers} (a trial's steps and validation are split over its workers)"
                    if workers > cfg.num_workers else "add --sweep_learning_rates")
        gpus = f"the Ray's {have:g} GPUs" if have == total.get("GPU", 0) else f"the {have:g} GPUs its autoscaler can give it"
        lines.append(f"sweep: warning: {idle} of {gpus} would sit idle while the trials train: {hint}")
    return lines


def remove_left_placement_groups() -> None:
    """Remove the placement groups this sweep's trials left: a trial ASHA stopped or that was killed takes its
    Train controller with it, and what the controller had reserved for its workers would stay held (and
    starve whatever runs next on the Ray) if Train's own cleaner missed it."""
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    try:  # the State API is the dashboard's: a Ray without one keeps what Train's cleaner left, and the results
        left = list_placement_groups(filters=[("creator_job_id", "=", job), ("state", "!=", "REMOVED")], limit=10_000)
    except Exception as e:
        why = (str(e).splitlines() or [""])[0]
        print(f"sweep: placement groups of stopped trials not checked ({type(e).__name__}: {why})", flush=True)
        return
    for group in left:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group.placement_group_id))))


def trial_name(t: Any) -> str:
    """Readable and deterministic (a timestamp in a name breaks a restore): lr0.005, the trial's learning rate."""
    return config_of(t.config).trial_label


def datasets(cfg: Config, manifest: dict[str, Any]) -> tuple[Any, Any]:
    """Train/val datasets, held in the object store when they fit.

    Re-reading and re-filtering small shards costs seconds of Ray Data start-up every epoch;
    materialized once here, every trial and epoch shares the same blocks.
    """
    import ray

    train, val = load_splits(cfg.shards_path, cfg.val_fraction, cfg.seed)
    size = manifest["num_tokens"] * manifest["hidden_size"] * value_bytes(manifest["storage_dtype"])
    budget = ray.available_resources().get("object_store_memory", 0) * 0.5
    if cfg.cache_datasets == "always" or (cfg.cache_datasets == "auto" and size < budget):
        print(f"sweep: holding {size / 2**20:,.1f} MiB of shards in the object store", flush=True)
        return train.materialize(), val.materialize()
    return train, val


def check_starts(cfg: Config) -> None:
    """Before any extraction: every D' fits the model, stage 1b's start (the stage 1a checkpoint of each D')
    is there and loads, and the LM head the run will read gives the model's own logits (`check_head`)."""
    d_model = hidden_size_of(cfg.model_name)
    for d in cfg.d_values:
        if not 0 < d < d_model:
            raise UserError(f"D' = {d} is not in 1..{d_model - 1}: {cfg.model_name} has hidden size D = {d_model}")
    for d in cfg.d_values:  # a 1b run never silently starts from scratch
        path = cfg.init_checkpoint(d)
        if path and not os.path.exists(path):
            raise UserError(f"stage 1b starts from a stage 1a checkpoint, and {path} does not exist: "
                            "run stage 1a first, or pass --compressor_checkpoint")
        if path:
            load_checkpoint(path, d_model=d_model, d_compressed=d)
    check_head(cfg)


def shards(cfg: Config) -> tuple[dict[str, Any], dict[str, int]]:
    """The shards' manifest (extracted now if missing), every shard checked against it, and the split's counts."""
    manifest = extract(cfg)
    verify_shards(cfg.shards_path, manifest)
    return manifest, split_counts(manifest, cfg.val_fraction, cfg.seed)


def limits(cfg: Config) -> dict[str, Any]:
    """The PCA references trials are measured against: the spectrum (mse, cosine, ... for every D'),
    and for a KL objective the PCA reconstruction's next-token KL over the validation set, per D'.
    The KL is stored beside the spectrum (`pca_kl-*.json`, with the manifest's key and the model), so
    a second sweep or a resumed one computes only the D' it has not seen."""
    limit = spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed)
    if cfg.objective == "mse":
        return limit
    if cfg.objective == "phase2":
        print(f"sweep: phase 2's references (the context's PCA limit, the closing states' PCA KL) and the best closed-form "
              f"start of D' = {cfg.d_values}", flush=True)
        return {**limit, **references_and_start(cfg.use_gpu, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed,
                                                cfg.d_values, {d: cfg.init_checkpoint(d) for d in cfg.d_values},
                                                start_path(cfg.output_dir), cfg.close_weight)}
    if cfg.init == "fisher" and cfg.stage == "1a" and stored(cfg.shards_path, cfg.val_fraction, cfg.seed,
                                                                      "fisher") is None:
        print(f"sweep: the LM head's Fisher information on up to {FISHER_TOKENS:,} training tokens, for --init fisher",
              flush=True)
        fisher_start(cfg.use_gpu, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed)
    kl = (stored_json(cfg.shards_path, cfg.val_fraction, cfg.seed, "pca_kl", model_name=cfg.model_name) or {}).get("kl", {})
    missing = [d for d in cfg.d_values if str(d) not in kl]
    if missing:
        print(f"sweep: next-token KL of the PCA reconstruction of D' = {missing} on the validation set", flush=True)
        kl.update(pca_kl(cfg.use_gpu, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, missing))
        store(cfg.shards_path, cfg.val_fraction, cfg.seed, "pca_kl", summary={"model_name": cfg.model_name, "kl": kl})
    return {**limit, "pca_downstream_kl": {str(d): kl[str(d)] for d in cfg.d_values}}


def trial_spec(cfg: Config, manifest: dict[str, Any], counts: dict[str, int], limit: dict[str, Any],
               train_storage: str, group: str = "", command: str = "") -> TrialSpec:
    """What a trial's training loop gets: the settings, facts derived from the shards, the references of
    each D' of the grid, and the command that started the sweep."""
    references = {"pca_mse": {d: limit["pca_mse"][d] for d in cfg.d_values},
                  **{k: {int(d): v for d, v in limit[k].items()} for k in REFERENCES[1:] if k in limit}}
    return TrialSpec(cfg, manifest["hidden_size"], counts["train_tokens"], references, train_storage, group, command)


def run(cfg: Config, overwrite: bool = False, command: str = "") -> list[dict[str, Any]]:
    """The whole sweep, in the order it happens; returns its result rows."""
    import ray

    cfg = resolved(cfg)
    total, most = ray.cluster_resources(), most_resources()
    concurrent = trials_that_fit(cfg, total, most)  # before anything runs: a trial that can never start
    if not cfg.closed_form:
        print("\n".join(usage(cfg, total, concurrent, most)), flush=True)
    check_starts(cfg)
    manifest, counts = shards(cfg)
    limit = limits(cfg)
    announce(cfg, manifest, counts)
    if cfg.closed_form:
        rows = closed_form(cfg, manifest, counts, limit, command)
    else:
        grid = tune_trials(cfg, manifest, counts, limit, concurrent, overwrite, command)
        remove_left_placement_groups()
        rows = export_results(grid, cfg, manifest, CHECKPOINT_FILE, limit)
    score(rows, cfg, manifest)
    save_rows(rows, cfg)
    plot_report(rows, limit, cfg, manifest)
    print_table(rows, cfg)
    print_regions(rows, manifest)
    return rows


def resolved(cfg: Config) -> Config:
    """Absolute paths (trials and tasks run in other working directories) and the model's full id."""
    return dataclasses.replace(cfg, shards_dir=absolute(cfg.shards_path), output_dir=absolute(cfg.output_dir),
                               model_name=model_id(cfg.model_name))


def announce(cfg: Config, manifest: dict[str, Any], counts: dict[str, int]) -> None:
    print(f"sweep: D={manifest['hidden_size']}, D' in {cfg.d_values}; {counts['train_tokens']:,} train tokens "
          f"({counts['train_docs']} docs), {counts['val_tokens']:,} validation tokens ({counts['val_docs']} docs)",
          flush=True)
    print(f"sweep: left out of training, metrics and the PCA limit: {exclusions(manifest)}", flush=True)


def experiment_name(cfg: Config) -> str:
    return f"stage{cfg.stage}_{'sweep' if cfg.sweep else f'd{cfg.d_compressed}'}"


def closed_form(cfg: Config, manifest: dict[str, Any], counts: dict[str, int], limit: dict[str, Any],
                command: str) -> list[dict[str, Any]]:
    """--closed_form: the PCA compressors exported with the spectrum pass's metrics, no trial."""
    print("sweep: --objective mse from --init pca has its optimum in closed form: exporting the PCA compressors with "
          "the spectrum pass's validation metrics, no SGD epoch (--no_closed_form or --num_epochs trains them)", flush=True)
    spec = trial_spec(cfg, manifest, counts, limit, "", f"{experiment_name(cfg)}-{uuid.uuid4().hex[:8]}", command)
    return export_closed_form(cfg, manifest, limit, spec.flat())


def tune_trials(cfg: Config, manifest: dict[str, Any], counts: dict[str, int], limit: dict[str, Any],
                concurrent: int | None, overwrite: bool, command: str) -> Any:
    """A Tune trial per learning rate, each training every D' (one read of each batch for all of them), under
    the per-width ASHA; a sweep interrupted with the same settings resumes. Returns Tune's result grid."""
    from ray import tune

    name = experiment_name(cfg)
    storage = os.path.join(cfg.output_dir, "ray_results")
    exp_dir = os.path.join(storage, name)
    resume = should_resume(exp_dir, cfg, overwrite)
    if not resume:
        for path in (exp_dir, os.path.join(storage, f"{name}_train")):
            shutil.rmtree(path, ignore_errors=True)
        write_json(os.path.join(exp_dir, SWEEP_CONFIG), dataclasses.asdict(cfg))

    # The W&B group: unique per sweep, fixed for its lifetime (it is part of the restored Tune state).
    group = f"{name}-{uuid.uuid4().hex[:8]}"
    param_space = {**trial_spec(cfg, manifest, counts, limit, os.path.join(storage, f"{name}_train"), group, command).flat(),
                   "learning_rate": tune.grid_search(cfg.sweep_learning_rates or [cfg.learning_rate])}
    tokens_per_epoch = counts["train_tokens"] - cfg.num_workers  # an equal split across workers drops a row or so
    scheduler = PerWidthASHA(
        rungs_path=os.path.join(exp_dir, "asha_rungs.json"), group=group, time_attr="tokens_seen", metric=cfg.rank_metric,
        mode="min" if cfg.rank_metric in LOWER_IS_BETTER else "max",
        max_t=cfg.num_epochs * tokens_per_epoch, grace_period=min(cfg.grace_period, cfg.num_epochs) * tokens_per_epoch,
        reduction_factor=2,
        stop_last_trials=False,  # the default kills the survivors at max_t before they finish cleanly
    )
    train, val = datasets(cfg, manifest)
    trainable = tune.with_parameters(trial, train=train, val=val, runtime={k: getattr(cfg, k) for k in sorted(RUNTIME_ONLY)})
    if resume:
        print(f"sweep: resuming {exp_dir}: finished trials are kept, unfinished ones continue from their latest "
              "checkpoint, errored ones are retried", flush=True)
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials or concurrent,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            # A trial's Tune function, Train controller and report queue live outside Train's workers, whose
            # deaths --max_failures covers in Train: a lost node that held one of them (a spot node) fails the
            # trial in Tune, which starts it again as often, and Train resumes it from its latest checkpoint.
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
    return tuner.fit()


def resumed_config(output_dir: str, stage: str | None = None) -> Config:
    """The settings an interrupted sweep in `output_dir` was started with (of `stage`, when it holds 1a and 1b)."""
    saved = [read_json(p) for p in sorted(glob.glob(os.path.join(output_dir, "ray_results", "*", SWEEP_CONFIG)))]
    found = [s for s in saved if stage is None or s.get("stage") == stage]
    if len(found) != 1:
        stages = sorted({s.get("stage") for s in saved})
        hint = (f": pass --stage ({' or '.join(stages)}) to pick one" if stage is None and len(stages) > 1
                else ": give the --output_dir of one interrupted sweep")
        raise UserError(f"{output_dir} holds {len(found) or 'no'} trm_ray sweep{'s' if len(found) != 1 else ''}"
                        f"{f' of stage {stage}' if stage else ''} to resume{hint}")
    return make_config(found[0])


def command_config(args: Any) -> Config:
    """The flags' Config; with --resume, the interrupted sweep's own settings, where only the settings
    that do not change results and take effect on a resume (RUNTIME_ONLY) may be given again, and
    --stage picks the sweep."""
    if not args.resume:
        return config_from_args(args)
    given = {k for k, v in vars(args).items() if k in FIELDS and v is not None}
    other = sorted(given - RUNTIME_ONLY - {"stage"}) + (["config"] if args.config else [])
    if other:
        raise UserError(f"--resume continues a sweep with its own settings; --{', --'.join(other)} cannot change them "
                        f"(only --{', --'.join(sorted(RUNTIME_ONLY))} and --stage may be given)")
    cfg = resumed_config(args.resume, args.stage)
    return dataclasses.replace(cfg, **{k: getattr(args, k) for k in given & RUNTIME_ONLY})


def main(argv: list[str] | None = None) -> None:
    from trm_ray.cli import run_cli
    from trm_ray.cluster import connect

    parser = build_parser("python -m trm_ray.sweep", __doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier run's results in --output_dir.")
    parser.add_argument("--resume", metavar="OUTPUT_DIR",
                        help="Continue the interrupted sweep in OUTPUT_DIR with its own settings (--stage picks 1a or 1b).")

    def main_() -> None:
        args = parser.parse_args(argv)
        cfg = command_config(args)
        check_before_ray(cfg)
        prepare_wandb(cfg)
        connect(cfg)
        command = shlex.join(["python", "-m", "trm_ray.sweep", *(sys.argv[1:] if argv is None else argv)])
        rows = run(cfg, overwrite=args.overwrite, command=command)
        if any(k in row for row in rows for k in FAILURES):  # failed trials, or a failed pass after the export
            sys.exit(1)

    run_cli(main_)


if __name__ == "__main__":
    main(sys.argv[1:])
