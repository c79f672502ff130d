"""One configuration for the whole flow: defaults here, a YAML file over them, CLI flags over that.

The flag names are the seed guide's (`--d_compressed`, `--no_wandb`, ...), so a command
from the seed era keeps working. Every field carries its help text, so the flag, its
default and its documentation live in one place (as in EleutherAI's sparsify).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trm_ray.names import ASHA_METRICS, KL_ONLY_METRICS


class UserError(Exception):
    """A problem the user can fix; CLIs print it as one line, without a traceback."""


def _f(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


# Peak learning rate per --objective, measured (benchmarks/RESULTS.md): from the PCA start, mse needs only
# a small step to stay at its optimum, while the KL objective has to turn the subspace towards what the head reads.
DEFAULT_LEARNING_RATE = {"mse": 1e-4, "kl": 5e-3, "mse+kl": 5e-3, "phase2": 1e-3}


@dataclass
class Config:
    # --- what to compress ---------------------------------------------------------------
    stage: str = _f("1a", "Training stage: 1a (plain text) or 1b (thinking trajectories).")
    model_name: str = _f("HuggingFaceTB/SmolLM3-3B", "Causal LM whose hidden states are compressed: hub id or local directory.")
    layer: int = _f(-1, "Index into the model's hidden_states tuple; -1 is the last (after the final norm).")
    dataset: str = _f("HuggingFaceFW/fineweb-edu", "Text source: a hub dataset id, or a local .jsonl/.parquet/.txt file or directory of them.")
    dataset_config: str | None = _f("sample-10BT", "Hub dataset configuration name (ignored for local files).")
    dataset_split: str = _f("train", "Hub dataset split to stream.")
    text_field: str = _f("text", "Column or JSON key that holds the text (stage 1a).")
    messages_field: str = _f("messages", "Column or JSON key that holds the conversation (stage 1b): a list of {role, content}, or ShareGPT {from, value} with human/gpt/system (converted).")
    keep_tokens: str = _f("phase2", "Stage 1b: which tokens of each conversation reach the shards: phase2 (what LLM-TRM's phase 2 compresses: "
                             "every token before the opening marker of the first assistant turn that thinks, and the state at the end of its "
                             "closing marker), thinking (the thinking spans of assistant turns, between --think_markers), or all.")
    think_markers: list[str] = _f(["<think>", "</think>"], "Stage 1b: the two strings that open and close a thinking span in an assistant turn's content, e.g. <|begin_of_thought|> <|end_of_thought|>.")
    chat_date: str = _f("2025-07-08", "Stage 1b: the date (YYYY-MM-DD) a chat template reading strftime_now writes (SmolLM3's 'Today Date'), pinned so that the rendered prompt, and so the hidden states, do not change with the day extraction runs.")
    num_samples: int = _f(50000, "Number of documents to extract.")
    max_seq_length: int = _f(512, "Tokens per document kept (longer ones are truncated).")
    exclude_first_token: bool | None = _f(None, "Leave each sequence's first token (an attention sink with an outsized norm) out of the shards; "
                                               "default: left out, except with --stage 1b --keep_tokens phase2 (phase 2 compresses it too, "
                                               "and compressors that never saw it reconstruct it poorly: benchmarks/RESULTS.md).", negative="keep_first_token")
    outlier_norm_factor: float = _f(0.0, "Drop tokens whose hidden-state norm exceeds this multiple of the shard's median norm (0: keep all).")
    # --- extraction -----------------------------------------------------------------------
    shards_dir: str | None = _f(None, "Where the hidden-state shards live; default <output_dir>/shards/stage<stage>.")
    docs_per_shard: int = _f(256, "Documents per Parquet shard (also the unit of resuming an extraction).")
    extract_batch_size: int = _f(64, "At most this many documents per forward pass of the LM during extraction.")
    extract_tokens_per_batch: int = _f(16384, "Extraction batches documents of similar length up to this many (padded) tokens per forward pass; it bounds the activation memory.")
    storage_dtype: str = _f("auto", "Shard value type: float32, bfloat16, or auto (the model's dtype: bfloat16 with --use_gpu, float32 on CPU; never float16).")
    skip_disk_check: bool = _f(False, "Extract even when the shards may not fit in the free space of their disk.")
    num_extract_workers: int | None = _f(None, "Model replicas extracting in parallel; default one per GPU of the cluster (at least 1, which an autoscaler adds with --use_gpu), or 1 on CPU.")
    # --- training -------------------------------------------------------------------------
    d_compressed: int = _f(256, "Compressed dimension D'.")
    init: str | None = _f(None, "Stage 1a start: pca (the top-D' eigenvectors of the training second moment: the MSE optimum), orthogonal (the seed's random start), or for a KL objective fisher (PCA in the metric of the LM head's Fisher information: the directions that move the logits most); default pca for mse, fisher for kl and mse+kl.")
    orthonormal: bool = _f(True, "Keep W's rows orthonormal (Riemannian Adam: the gradient projected onto the tangent space, a QR retraction after every step), so WᵀW stays an orthogonal projection; --no_orthonormal: the seed's plain AdamW.", negative="no_orthonormal")
    objective: str | None = _f(None, "Training loss: mse (reconstruction), kl (next-token KL of the LM head reading the reconstruction, "
                                     "last layer only; starts from --init, fisher by default, or in stage 1b from the 1a checkpoint), mse+kl, "
                                     "or phase2 (stage 1b, --keep_tokens phase2, last layer: each of phase 2's regions for its own use, the "
                                     "context's mse and the closing state's KL, each against its own PCA reference; see README). "
                                     "Default: phase2 where it applies, else mse.")
    kl_weight: float = _f(1.0, "With --objective mse+kl: the loss is mse + kl_weight * KL.")
    close_weight: float = _f(0.01, "With --objective phase2: the loss is context mse / its PCA mse + close_weight * closing-state KL / "
                                  "its PCA KL, each a mean over its own region's rows (benchmarks/RESULTS.md measures the choice).")
    batch_size: int = _f(8, "Batch size per worker, in sequences of max_seq_length tokens.")
    num_epochs: int | None = _f(None, "Maximum training epochs; default 10. Given explicitly, stage 1a's mse sweep from the PCA start trains "
                                      "(see --closed_form).")
    learning_rate: float | None = _f(None, "Peak AdamW learning rate; default 1e-4 for --objective mse (small: the PCA start is already the MSE optimum; the seed's 1e-3 suits an orthogonal start), 5e-3 for kl and mse+kl (PCA is only where the search for the LM head's subspace starts).")
    weight_decay: float = _f(0.0, "AdamW weight decay (0: decay would pull the tied matrix off orthonormality).")
    warmup_ratio: float = _f(0.05, "Fraction of all steps spent in linear warm-up before the cosine decay.")
    grad_clip: float = _f(1.0, "Gradient-norm clipping threshold.")
    val_fraction: float = _f(0.1, "Fraction of documents held out for validation.")
    seed: int = _f(42, "Random seed, 0 or more (initialisation, data order, validation split).")
    early_stopping: bool = _f(True, "Stop a trial when validation mse stops improving.", negative="no_early_stopping")
    early_stopping_patience: int = _f(3, "Epochs without improvement before early stopping.")
    early_stopping_min_delta: float = _f(1e-3, "Smallest relative drop of validation mse that counts as an improvement.")
    torch_compile: bool = _f(True, "Compile the training step with torch.compile (falls back to eager where it fails).", negative="no_torch_compile")
    compressor_checkpoint: str | None = _f(None, "Stage 1b: the stage 1a checkpoint to start from; default <output_dir>[/d<D'>]/stage1a_best.pt.")
    output_dir: str = _f("./checkpoints/phase1", "Checkpoint directory (seed layout).")
    cache_datasets: str = _f("auto", "Hold the shards in Ray's object store for all trials: auto (when they fit in half of it), always, never.")
    closed_form: bool | None = _f(None, "Stage 1a, --objective mse, --init pca: export the PCA compressors straight from the spectrum pass (they are "
                                        "the training MSE's optimum, so SGD from them only adds noise) with their validation metrics, no epoch "
                                        "spent; --no_closed_form trains them with SGD anyway. Default: on for that case unless --num_epochs is given.",
                                  negative="no_closed_form")
    # --- sweep ----------------------------------------------------------------------------
    sweep: bool = _f(False, "Sweep D' over sweep_d_values instead of training one D'.")
    sweep_d_values: list[int] = _f([64, 128, 256, 512, 1024], "D' values of the sweep.")
    grace_period: int = _f(2, "ASHA: epochs every trial runs before it can be stopped.")
    asha_metric: str = _f("auto", "ASHA ranks the trials of each D' on this metric; auto: pca_efficiency (PCA-limit mse / mse) for "
                             "--objective mse, else downstream_efficiency (PCA's next-token KL / the trial's).")
    sweep_learning_rates: list[float] = _f([], "Also grid over these learning rates (empty: just --learning_rate); the export keeps the best trial per D'.")
    downstream: bool = _f(True, "Score each exported D' and its PCA reconstruction at the LM head (next-token KL, CE increase, top-1 agreement) "
                                "over the whole validation set (last layer only); without it a KL objective's rows keep the KL its trials were selected on.", negative="no_downstream")
    kl_budget: float = _f(0.1, "Next-token KL (nats per token) the summary and the plot hold each D' to: they name the smallest D' whose "
                               "exported compressor is within it. 0.1 is a tenth of what PCA costs at ~10x on real LMs "
                               "(1.20 at D'=64 of 576, SmolLM2-135M; 1.45 at 64 of 640, a 270M LM).")
    max_concurrent_trials: int | None = _f(None, "Trials running at once; default: as many as the cluster fits.")
    # --- Weights & Biases ---------------------------------------------------------------
    use_wandb: bool = _f(True, "Log each trial to Weights & Biases (offline with WANDB_MODE=offline; no key needed then).", negative="no_wandb")
    wandb_project: str = _f("llm-trm-phase1", "W&B project.")
    wandb_run_name: str | None = _f(None, "W&B run name prefix; default stage<stage>; each trial appends -d<D'>.")
    # --- Ray ------------------------------------------------------------------------------
    num_workers: int = _f(1, "Ray Train workers (data-parallel ranks, their gradients averaged every step) per trial.")
    max_failures: int = _f(3, "Times a trial's workers may die and be replaced, resuming from the latest checkpoint.")
    use_gpu: bool = _f(False, "Run on GPUs: each training worker, extraction replica and the downstream-KL task requests one (an autoscaler adds GPU nodes for them).")
    address: str | None = _f(None, "Ray cluster to join ('auto' inside a cluster); default: start a local one.")
    num_cpus: int | None = _f(None, "Logical CPUs of a local Ray; default: the core count, or what the trials that the cores can run need (a Tune function and the workers of each, plus one).")

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = "phase2" if self.stage == "1b" and self.keep_tokens == "phase2" and self.layer == -1 else "mse"
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE.get(self.objective, DEFAULT_LEARNING_RATE["mse"])
        if self.stage not in ("1a", "1b"):
            raise UserError(f"stage must be 1a or 1b, got {self.stage!r}")
        if self.storage_dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"storage_dtype must be auto, float32 or bfloat16, got {self.storage_dtype!r}")
        if self.init is None:
            self.init = "pca" if self.objective in ("mse", "phase2") else "fisher"
        if self.init not in ("orthogonal", "pca", "fisher"):
            raise UserError(f"init must be orthogonal, pca or fisher, got {self.init!r}")
        if self.init == "fisher" and self.objective in ("mse", "phase2"):
            raise UserError("init fisher weights directions by the LM head, which --objective mse never reads: "
                            "use it with --objective kl or mse+kl, or --init pca")
        if self.objective not in ("mse", "kl", "mse+kl", "phase2"):
            raise UserError(f"objective must be mse, kl, mse+kl or phase2, got {self.objective!r}")
        if self.objective == "phase2" and not (self.stage == "1b" and self.keep_tokens == "phase2"):
            raise UserError("--objective phase2 trains phase 2's two regions, which only stage 1b shards of --keep_tokens phase2 "
                            f"hold (this run: stage {self.stage}, keep_tokens {self.keep_tokens}): pick another --objective")
        optimum_known = self.stage == "1a" and self.objective == "mse" and self.init == "pca"
        if self.closed_form is None:
            self.closed_form = optimum_known and self.num_epochs is None
        if self.closed_form and not optimum_known:
            raise UserError(f"--closed_form exports PCA, the optimum of stage 1a's mse from --init pca; this run is stage {self.stage}, "
                            f"--objective {self.objective}, --init {self.init}, which SGD trains: drop --closed_form")
        if self.num_epochs is None:
            self.num_epochs = 10
        if self.kl_budget <= 0:
            raise UserError(f"kl_budget must be a positive number of nats per token, got {self.kl_budget}")
        if self.objective != "mse" and self.layer != -1:
            raise UserError(f"--objective {self.objective} trains on what the LM head reads, the last layer's hidden state: "
                            f"it needs --layer -1, not {self.layer}")
        if self.keep_tokens not in ("phase2", "thinking", "all"):
            raise UserError(f"keep_tokens must be phase2, thinking or all, got {self.keep_tokens!r}")
        if self.exclude_first_token is None:
            self.exclude_first_token = self.kept_tokens != "phase2"
        if len(self.think_markers) != 2 or not all(self.think_markers) or self.think_markers[0] == self.think_markers[1]:
            raise UserError(f"think_markers must be two different non-empty strings (open, close), got {self.think_markers!r}")
        try:
            datetime.date.fromisoformat(self.chat_date)
        except (TypeError, ValueError):
            raise UserError(f"chat_date must be a date as YYYY-MM-DD, got {self.chat_date!r}") from None
        if self.cache_datasets not in ("auto", "always", "never"):
            raise UserError(f"cache_datasets must be auto, always or never, got {self.cache_datasets!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("num_samples", "max_seq_length", "batch_size", "num_epochs", "num_workers",
                     "docs_per_shard", "extract_batch_size", "extract_tokens_per_batch", "early_stopping_patience",
                     "grace_period"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise UserError(f"seed must be 0 or more, got {self.seed}")
        if self.asha_metric != "auto" and self.asha_metric not in ASHA_METRICS:
            raise UserError(f"asha_metric must be one of {', '.join(ASHA_METRICS)}, got {self.asha_metric!r}")
        if self.asha_metric in KL_ONLY_METRICS and self.objective in ("mse", "phase2"):
            raise UserError(f"asha_metric {self.asha_metric} is measured only with --objective kl or mse+kl: "
                            "pick another metric, or set --objective")
        if self.asha_metric == "phase2_score" and self.objective != "phase2":
            raise UserError("asha_metric phase2_score is measured only with --objective phase2: pick another metric")
        for d in [self.d_compressed, *self.sweep_d_values]:
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise UserError(f"D' must be a positive integer, got {d!r}: pass e.g. --d_compressed 256")
        # Two equal values would be two trials with the same name, Tune and Train directories and W&B run.
        for name, labels in (("sweep_d_values", [str(d) for d in self.sweep_d_values]),
                             ("sweep_learning_rates", [f"{lr:g}" for lr in self.sweep_learning_rates])):
            repeated = sorted({v for v in labels if labels.count(v) > 1})
            if repeated:
                raise UserError(f"{name} lists {', '.join(repeated)} more than once: give each value once")

    @property
    def d_values(self) -> list[int]:
        """The D' values this run trains: the sweep grid, or the single --d_compressed."""
        return list(self.sweep_d_values) if self.sweep else [self.d_compressed]

    @property
    def score_metric(self) -> str:
        """What "best" means for an epoch, a trial and early stopping: validation mse, or next-token KL
        when that is what the compressor is trained for (lower is better either way)."""
        return {"mse": "mse", "phase2": "phase2_score"}.get(self.objective, "downstream_kl")

    @property
    def rank_metric(self) -> str:
        """The D'-fair metric ASHA ranks a width's trials on (higher is better for the auto choices)."""
        if self.asha_metric != "auto":
            return self.asha_metric
        return {"mse": "pca_efficiency", "phase2": "phase2_score"}.get(self.objective, "downstream_efficiency")

    @property
    def shards_path(self) -> str:
        return self.shards_dir or os.path.join(self.output_dir, "shards", f"stage{self.stage}")

    @property
    def document_field(self) -> str:
        """The setting that names a record's document: text_field (stage 1a) or messages_field (1b)."""
        return "text_field" if self.stage == "1a" else "messages_field"

    @property
    def kept_tokens(self) -> str:
        """Which tokens of a document reach the shards: --keep_tokens in stage 1b, all of them in 1a."""
        return self.keep_tokens if self.stage == "1b" else "all"

    def export_path(self, d_compressed: int, stage: str | None = None) -> str:
        """The seed's layout: <output_dir>/d<D'>/stage<stage>_best.pt in a sweep, else <output_dir>/stage<stage>_best.pt."""
        name = f"stage{stage or self.stage}_best.pt"
        return os.path.join(self.output_dir, f"d{d_compressed}", name) if self.sweep else os.path.join(self.output_dir, name)

    def results_path(self, kind: str = "results", ext: str = "json") -> str:
        """sweep_results.json (and .csv, and the plot sweep_report.png) for stage 1a; stage 1b's sit beside them
        without replacing them. Built from the file name alone, so no part of --output_dir is ever rewritten."""
        name = f"sweep_{kind}" if self.stage == "1a" else f"sweep_{kind}_stage{self.stage}"
        return os.path.join(self.output_dir, f"{name}.{ext}")

    @property
    def trial_label(self) -> str:
        """A trial's name in Tune and Train: its learning rate (it trains every D' of the grid)."""
        return f"lr{self.learning_rate:g}"

    def run_label(self, d: int) -> str:
        """One D''s name in W&B, its artifacts and the dashboard: d256, or d256-lr0.001 when the sweep grids learning rates."""
        return f"d{d}" + (f"-lr{self.learning_rate:g}" if self.sweep_learning_rates else "")

    def wandb_name(self, d: int) -> str:
        """A D''s W&B run: <prefix>-d256 (-lr0.001 in an lr grid), the prefix --wandb_run_name or stage<stage>."""
        return f"{self.wandb_run_name or f'stage{self.stage}'}-{self.run_label(d)}"

    def init_checkpoint(self, d_compressed: int) -> str | None:
        """Stage 1b starts from the stage 1a checkpoint of the same D'; stage 1a from scratch."""
        if self.stage == "1a":
            return None
        return self.compressor_checkpoint or self.export_path(d_compressed, stage="1a")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[int]` stays list[int]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Config)
    return {name: _base_type(hints[name]) for name in FIELDS}


def _check_keys(keys: list[str], where: str) -> None:
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown key {key!r} in {where}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a tune_configs/*.yaml file into a dict of Config fields, refusing unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    _check_keys(list(data), str(path))
    return data


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field; bools get --x / --no_x."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of options (see tune_configs/); flags override it.")
    for name, tp in _field_types().items():
        help = FIELDS[name].metadata["help"]
        if tp is bool:
            negative = FIELDS[name].metadata.get("negative", f"no_{name}")
            parser.add_argument(f"--{name}", dest=name, action="store_const", const=True, default=None, help=help)
            parser.add_argument(f"--{negative}", dest=name, action="store_const", const=False, help=f"Turn off --{name}.")
        elif typing.get_origin(tp) is list:
            parser.add_argument(f"--{name}", nargs="+", type=typing.get_args(tp)[0], default=None, help=help)
        else:
            parser.add_argument(f"--{name}", type=tp, default=None, help=help)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- YAML file (--config) <- flags given on the command line."""
    values = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    return make_config(values)


def _number(name: str, value: Any) -> float:
    """A float from a YAML/JSON number or a numeric string (YAML 1.1 reads `1e-3` as a string)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None


def make_config(values: dict[str, Any]) -> Config:
    _check_keys(list(values), "the configuration")
    types_ = _field_types()
    for name, value in values.items():
        if value is None:
            continue
        tp = types_[name]
        if typing.get_origin(tp) is list:
            if not isinstance(value, list):
                raise UserError(f"{name} must be a list, got {value!r}: write e.g. {name}: [{value}]")
            if typing.get_args(tp)[0] is float:
                values[name] = [_number(name, v) for v in value]
        elif tp is bool and not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        elif tp is float:
            values[name] = _number(name, value)
        elif tp is str and isinstance(value, datetime.date):  # YAML reads an unquoted 2025-07-08 as a date
            values[name] = value.isoformat()
        elif tp is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise UserError(f"{name} must be an integer, got {value!r}")
    return Config(**values)
