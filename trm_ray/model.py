"""The LLM in one room: what trm_ray knows about the model whose hidden states it compresses.

Its config and hidden size, which `--layer` means (`hidden_states[layer]`, for any causal LM
of transformers), the model cut at that layer for extraction, its FLOPs per token for the CPU
estimate, and its LM head with the config's transform of the final logits, for the KL objective
and the downstream measure. Extraction (`trm_ray.extract`), training and scoring ask here.

The cut drops the decoder blocks after the layer, and the final norm too for any layer but the
last, wherever the blocks and the norm can be found; a cut that does not reproduce
`hidden_states[layer]` on a probe is not used: the full model then runs with
`output_hidden_states=True` (slower, still right). The head is read alone from the checkpoint's
weight files: building a 3B model in every worker to take its [V, D] matrix would cost 12 GB.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from trm_ray.config import UserError
from trm_ray.kl import LMHead
from trm_ray.text import load_tokenizer, looks_like_path

CPU_FLOPS_PER_CORE = 50e9  # a generous sustained float32 matmul rate of one AVX-512 core

# Attribute names of the final norm beside the block list, across transformers' decoders.
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "ln_final")

# How the two ways of extracting a layer are recorded in the manifest (`layer_cut`).
CUT_BLOCKS, CUT_HIDDEN_STATES = "blocks", "hidden_states"


def load_model_config(model_name: str) -> Any:
    """The model's (text) config, with a one-line error for a path that is not there or a model that is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not os.path.exists(model_name) and looks_like_path(model_name):
        raise UserError(f"model path {model_name} does not exist: give a local model directory or a hub id")
    try:
        config = AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {model_name}: {str(e).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{model_name} is a {config.model_type!r} model without a causal-LM head (an encoder or "
                        "encoder-decoder): give a causal (decoder-only) LM")
    return config.get_text_config()


def hidden_size_of(model_name: str) -> int:
    return int(load_model_config(model_name).hidden_size)


def model_id(model_name: str) -> str:
    """A local model directory made absolute (workers run elsewhere, and the manifest must not depend on the
    current directory); a hub id as it is. Every entry point names the model this way."""
    return os.path.abspath(model_name) if os.path.exists(model_name) else model_name


def check_layer(model_name: str, layer: int) -> None:
    """hidden_states has num_hidden_layers + 1 entries (the embeddings first): `layer` must index one."""
    layer_index(int(load_model_config(model_name).num_hidden_layers), layer)


def layer_index(num_layers: int, layer: int) -> int:
    """`layer` as a non-negative index into hidden_states (num_layers + 1 entries: the embeddings, then
    each layer's output; the last one after the final norm)."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise UserError(f"layer {layer} is out of range, outside the model's {num_layers + 1} hidden states: "
                        f"give {-(num_layers + 1)}..{num_layers} (0 the embeddings, {num_layers} or -1 the last layer)")
    return layer % (num_layers + 1)


def decoder_blocks(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(the module holding the decoder blocks, the block list's attribute name): the first ModuleList of
    num_hidden_layers modules (`layers`, `h`, `decoder.layers`, ...); None when there is none."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, name
    return None


def cut_at_layer(model: nn.Module, layer: int) -> bool:
    """Truncate the base model in place so that its `last_hidden_state` is `hidden_states[layer]`; False
    (nothing changed) where its blocks cannot be found.

    The blocks after the requested one are dropped, and for any layer but the last the final
    norm too (hidden_states[i] < num_layers is the raw residual stream). One forward then
    computes exactly what is stored: no LM head, no later layers, no tuple of every layer.
    """
    n = model.config.num_hidden_layers
    index = layer_index(n, layer)
    found = decoder_blocks(model)
    if index == n or found is None:
        return index == n
    parent, name = found
    setattr(parent, name, getattr(parent, name)[:index])
    for norm in FINAL_NORMS:
        if isinstance(getattr(parent, norm, None), nn.Module):
            setattr(parent, norm, nn.Identity())
    return True


class HiddenStatesAt(nn.Module):
    """The whole model, answering like a cut one: `last_hidden_state` is its `hidden_states[index]`.
    The slow path, for a model whose blocks or final norm trm_ray cannot cut."""

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, **inputs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[self.index]
        return BaseModelOutput(last_hidden_state=hidden)


def probe_inputs(config: Any, device: torch.device) -> dict[str, Any]:
    """A probe of a few tokens any model of `config` reads: 8 token ids, no padding, no cache."""
    return {"input_ids": (torch.arange(1, 9, device=device) % config.vocab_size)[None],
            "attention_mask": torch.ones(1, 8, dtype=torch.long, device=device), "use_cache": False}


@torch.no_grad()
def cut_or_whole(model: nn.Module, layer: int) -> tuple[nn.Module, str]:
    """(a module whose `last_hidden_state` is `hidden_states[layer]`, CUT_BLOCKS or CUT_HIDDEN_STATES).

    The cut is kept only where, on a probe of a few tokens, it gives what the whole model's
    `hidden_states[layer]` holds: a model may do more after its blocks than a final norm (OPT's
    `project_out`) or run its blocks by index, and its cut would be wrong or fail."""
    index = layer_index(model.config.num_hidden_layers, layer)
    probe = probe_inputs(model.config, next(model.parameters()).device)
    expected = model(**probe, output_hidden_states=True).hidden_states[index].float()
    found = decoder_blocks(model)
    parent = found[0] if found else model
    before = dict(parent.named_children())
    if cut_at_layer(model, layer):
        tol = 1e-5 if next(model.parameters()).dtype == torch.float32 else 2e-2  # float32, or bf16 on a GPU
        try:
            got = model(**probe).last_hidden_state.float()
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=tol, atol=tol):
                return model, CUT_BLOCKS
        except Exception:  # a forward that indexes the blocks it no longer has: the cut does not fit this model
            pass
        for name, child in before.items():
            setattr(parent, name, child)
    return HiddenStatesAt(model, index), CUT_HIDDEN_STATES


def load_model(model_name: str, device: torch.device, layer: int) -> tuple[Any, nn.Module, str]:
    """Tokenizer, the base model cut at `layer` (`cut_or_whole`) and which path that is; bf16 on GPU
    (as the model is served), float32 on CPU."""
    from transformers import AutoModel

    load_model_config(model_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(model_name)
    model = AutoModel.from_pretrained(model_name, dtype=dtype).to(device).eval()  # SDPA attention where the model has it
    model, cut = cut_or_whole(model, layer)
    return tokenizer, model, cut


def flops_per_token(model_config: Any, layer: int) -> float:
    """Forward FLOPs per token up to `layer`: 2 x the parameters that multiply (the embedding is a lookup).
    Attention's own O(sequence) term is left out: a few percent at 512 tokens and D=2048."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(model_config)
    cut_at_layer(model, layer)
    lookup = model.get_input_embeddings().weight.numel()
    return 2.0 * (sum(p.numel() for p in model.parameters()) - lookup)


# --- the LM head ------------------------------------------------------------------------

# Config fields that change the final logits, by what the model's ForCausalLM does with them
# (read off transformers' modeling files): soft-capping cap * tanh(logits / cap) (Gemma 2/3,
# RecurrentGemma, xLSTM, nanochat, ...), a factor (Cohere, MuseGlimmer, Falcon-H1) or a divisor
# (Granite; Inkling divides the hidden state, the same for a head without bias), applied before the
# cap. `check_lm_head` refuses a model whose logits these do not reproduce.
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
MULTIPLY = ("logit_scale", "output_multiplier", "lm_head_multiplier")
DIVIDE = ("logits_scaling", "logits_mup_width_multiplier")
MULTIPLY_BY_TYPE = {"hyperclovax": "logits_scaling"}  # HyperCLOVA X multiplies by what Granite divides by
# Fields that change the logits in a way trm_ray does not reproduce: the logits cut to a smaller vocabulary.
UNSUPPORTED = ("unpadded_vocab_size",)


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) with which the model turns its head's raw logits into its final logits:
    softcap * tanh(scale * raw / softcap), or scale * raw when softcap is None."""
    for name in UNSUPPORTED:
        if getattr(config, name, None) is not None:
            raise UserError(f"the {config.model_type!r} model changes its logits by {name}={getattr(config, name)}, which "
                            "trm_ray does not reproduce: its KL would be wrong; use --objective mse --no_downstream")

    def value(name: str) -> float:
        return float(getattr(config, name, None) or 1.0)

    multiply = MULTIPLY + ((MULTIPLY_BY_TYPE[config.model_type],) if config.model_type in MULTIPLY_BY_TYPE else ())
    divide = tuple(n for n in DIVIDE if n not in multiply)
    scale = math.prod(value(n) for n in multiply) / math.prod(value(n) for n in divide)
    softcap = next((float(getattr(config, n)) for n in SOFTCAPS if getattr(config, n, None)), None)
    return scale, softcap


def head_parameters(config: Any) -> tuple[list[str], list[str], Callable[[str], str]]:
    """(the names the output embedding's weight goes by in the causal LM, those of its bias, the model's
    name for a checkpoint key). Tied embeddings: the input embedding's name too. Learnt from the model
    built on the meta device, and the renaming transformers' loader applies to checkpoint keys (older
    names such as GPT-NeoX's `embed_out`, a base-model prefix added or dropped)."""
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = model.get_output_embeddings()
    if out is None or not isinstance(getattr(out, "weight", None), torch.Tensor):
        raise UserError(f"the {config.model_type!r} model has no output embedding trm_ray can read: give a causal LM with an LM head")
    params = list(model.named_parameters(remove_duplicate=False))
    weights = [n for n, p in params if p is out.weight]
    biases = [n for n, p in params if getattr(out, "bias", None) is not None and p is out.bias]
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    meta = dict(params)
    return weights, biases, lambda key: rename_source_key(key, renamings, [], model.base_model_prefix, meta)[0]


def checkpoint_key(names: list[str], keys: list[str], model_name_of: Callable[[str], str]) -> str | None:
    """The checkpoint key that loads into one of `names` (`head_parameters`), None when there is none."""
    return next((k for k in keys if k in names or model_name_of(k) in names), None)


def checkpoint_tensor(model_name: str, names: list[str], model_name_of: Callable[[str], str]) -> torch.Tensor | None:
    """The tensor that goes by one of `names`, read alone from the checkpoint's weight files (local or
    hub; safetensors, sharded or not, else .bin memory-mapped); None when the checkpoint holds none of them."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if path := find(index):
            weight_map = json.load(open(path))["weight_map"]
            key = checkpoint_key(names, list(weight_map), model_name_of)
            return None if key is None else file_tensor(find(weight_map[key]), lambda keys: key)
        if path := find(single):
            return file_tensor(path, lambda keys: checkpoint_key(names, keys, model_name_of))
    raise UserError(f"{model_name} has no model.safetensors or pytorch_model.bin (nor an index of them): "
                    "give a model saved with save_pretrained")


def file_tensor(path: str, pick: Callable[[list[str]], str | None]) -> torch.Tensor | None:
    """The tensor `pick` chooses among one weight file's keys (None: none), the rest of the file unread."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            key = pick(list(f.keys()))
            return None if key is None else f.get_tensor(key)
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    key = pick(list(state))
    return None if key is None else state[key].clone()


def load_lm_head(model_name: str, device: torch.device, dtype: torch.dtype | None = None) -> LMHead:
    """The model's LM head alone (for tied embeddings, the input embedding matrix), frozen, on `device`,
    with the config's transform of the logits; nothing else of the model is built or read.

    By default bf16 on GPU (as the model is served, for training), float32 on CPU. `hidden_states[-1]`
    already went through the final norm, so the head is all that reads it."""
    config = load_model_config(model_name)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    scale, softcap = logit_transform(config)
    weight_names, bias_names, model_name_of = head_parameters(config)
    weight = checkpoint_tensor(model_name, weight_names, model_name_of)
    if weight is None:
        raise NoLMHead(f"{model_name}'s weight files hold no {' or '.join(weight_names)}: it has no LM head")
    bias = checkpoint_tensor(model_name, bias_names, model_name_of) if bias_names else None
    if bias_names and bias is None:  # a tied head's own bias: the input embedding of a model saved without its head
        raise NoLMHead(f"{model_name}'s weight files hold no {bias_names[0]}: it has no LM head")
    return LMHead(weight.to(device, dtype), None if bias is None else bias.to(device, dtype), scale, softcap).eval()


class NoLMHead(UserError):
    """The weight files hold no LM head (a sentence encoder saved as its base model): there is no next-token
    distribution to score against, which is not a failure of what reads the hidden states."""


@functools.cache
@torch.no_grad()
def check_lm_head(model_name: str) -> bool:
    """Whether `model_name` has an LM head (False: its weight files hold none, `NoLMHead`), once `load_lm_head`'s
    head is seen to give the model's own final logits on a probe of a few tokens; a head it does not reproduce
    (a transform of the logits trm_ray does not know) is refused in one line, before its KL is computed wrongly.

    The model runs with its first block only: the head reads `hidden_states[-1]`, whatever the blocks did, so
    one block tests it as well as all of them, and a 3B model costs its embeddings and head, not its 12 GB.
    Cached: a sweep checks its model once, in the driver at its start, and the workers only load the head."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    try:
        head = load_lm_head(model_name, torch.device("cpu"), torch.float32)
    except NoLMHead:
        return False
    config = AutoConfig.from_pretrained(model_name)
    config.get_text_config().num_hidden_layers = 1
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the blocks left out are not worth a table of unexpected keys
    try:
        model = AutoModelForCausalLM.from_pretrained(model_name, config=config, dtype=torch.float32).eval()
    finally:
        logging.set_verbosity(verbosity)
    out = model(**probe_inputs(config.get_text_config(), torch.device("cpu")), output_hidden_states=True)
    got, want = head(out.hidden_states[-1]), out.logits.float()
    gap = float((got - want).abs().max()) if got.shape == want.shape else math.inf
    if gap > 1e-4 * float(want.abs().max()) + 1e-5:
        raise UserError(f"the LM head trm_ray reads from {model_name} ({head.extra_repr()}) does not give the model's own "
                        f"logits: they differ by {gap:.3g} on logits up to {float(want.abs().max()):.3g}, so its KL would be "
                        "wrong: use --objective mse --no_downstream")
    return True


