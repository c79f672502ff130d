"""Text -> tokens: where documents come from, how a conversation is rendered, which tokens are kept.

The other half of extraction (tokens -> hidden states -> shards) is `trm_ray.extract`; this
module never touches the model, only its tokenizer, so what reaches the shards can be
checked without running an LLM.

Stage 1b keeps, by --keep_tokens, the states LLM-TRM's phase 2 compresses (`phase2`: the
context before the assistant's opening marker, and the state at the end of the closing one),
the reasoning of assistant turns (`thinking`), or every token (`all`); each kept token's region
(`REGIONS`) goes into the shards with it. A real chat template adds text of its own around the
messages: SmolLM3's writes a default system prompt that contains `<think> Thought section
</think>`, the day's date (`strftime_now`), and an empty `<think>\n\n</think>` in no-think
mode. So spans are taken from the assistant messages themselves, never from marker tokens in
the rendered prompt, and the date is pinned.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from trm_ray.config import Config, UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES) or name.count("/") > 1


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(LOCAL_SUFFIXES))
        if not files:
            raise UserError(f"{path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    return [path]


def _records_from_file(path: str) -> Iterable[dict[str, Any]]:
    if path.endswith(".parquet"):
        # Batch by batch: only the first num_samples documents are ever held, however large the file.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif path.endswith(".txt"):
        # Documents are separated by blank lines.
        with open(path) as f:
            for block in f.read().split("\n\n"):
                yield {"text": block.strip()}
    elif path.endswith(".json") and _starts_with(path, "["):  # one JSON array of records
        with open(path) as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        for n, record in enumerate(records):
            yield _record(record, f"{path}[{n}]")
    else:  # JSON Lines, also under a .json name
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{n} is not valid JSON") from None
                    yield _record(record, f"{path}:{n}")


def _starts_with(path: str, char: str) -> bool:
    with open(path) as f:
        return f.read(4096).lstrip().startswith(char)


def _record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object of fields: "
                        "give one JSON object per line, or a JSON array of objects")
    return record


def check_dataset(dataset: str) -> None:
    """A local dataset that is not there (a hub id is looked up when it is read)."""
    if not os.path.exists(dataset) and looks_like_path(dataset):
        raise UserError(f"dataset {dataset} does not exist: give an existing file or directory, or a hub dataset id")


def read_records(cfg: Config) -> Iterable[dict[str, Any]]:
    """Records from local files, or streamed from the hub (nothing is downloaded whole)."""
    check_dataset(cfg.dataset)
    if os.path.exists(cfg.dataset):
        for path in _local_files(cfg.dataset):
            yield from _records_from_file(path)
    else:
        import datasets

        yield from datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split, streaming=True)


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def to_messages(conversation: Any, field: str) -> list[dict[str, str]]:
    """A conversation as {role, content} messages; ShareGPT's {from, value} (human/gpt/system) is converted."""
    if not isinstance(conversation, list):
        raise UserError(f"the {field!r} field must hold a list of messages, got {type(conversation).__name__}")
    messages = []
    for m in conversation:
        if isinstance(m, dict) and "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif isinstance(m, dict) and "from" in m and "value" in m:
            role, content = SHAREGPT_ROLES.get(m["from"], m["from"]), m["value"]
        else:
            keys = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise UserError(f"messages in the {field!r} field must be {{role, content}} or ShareGPT {{from, value}}, got {keys}")
        if not isinstance(content, str):
            raise UserError(f"a {role!r} message in the {field!r} field has {type(content).__name__} content; text is needed")
        messages.append({"role": role, "content": content})
    return messages


def read_documents(cfg: Config) -> list[Any]:
    """The first `num_samples` documents: texts (stage 1a) or conversations as {role, content} lists (stage 1b)."""
    key = getattr(cfg, cfg.document_field)
    docs = []
    for record in read_records(cfg):
        if key not in record:
            raise UserError(f"records of {cfg.dataset} have no {key!r} field (they have {sorted(record)}): set --{cfg.document_field}")
        doc = record[key]
        if cfg.stage == "1b" and doc:
            doc = to_messages(doc, key)
        if (isinstance(doc, str) and doc.strip()) or (isinstance(doc, list) and doc):
            docs.append(doc)
            if len(docs) == cfg.num_samples:
                break
    if not docs:
        raise UserError(f"dataset {cfg.dataset} holds no non-empty {key!r} documents")
    return docs


# --- chat rendering -------------------------------------------------------------------------

def load_tokenizer(model_name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_name)


def chat_template(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} has no (single) chat template to render conversations with")
    return template


def pinned_template(template: str, date: str) -> tuple[str, dict[str, str]]:
    """The template with its `strftime_now` fixed to `date`, and the variables it then needs.

    transformers offers `strftime_now` (today's date) as a Jinja global and turns any callable
    passed as a template variable into a placeholder string, so it cannot be overridden from
    outside. A macro of the same name defined at the top of the template shadows the global;
    it looks each format the template uses up in a table of `date` formatted in advance.
    """
    if "strftime_now" not in template:
        return template, {}
    formats = {m.group(2) for m in re.finditer(r"strftime_now\(\s*(['\"])(.*?)\1\s*\)", template)}
    day = datetime.date.fromisoformat(date)
    macro = "{%- macro strftime_now(format) -%}{{- trm_pinned_dates[format] -}}{%- endmacro -%}"
    return macro + template, {"trm_pinned_dates": {f: day.strftime(f) for f in formats}}


def chat_settings(tokenizer: Any, cfg: Config) -> dict[str, Any] | None:
    """What a conversation's rendering depends on besides its messages (the manifest records it:
    another template, date or markers makes other shards). None for stage 1a (no rendering)."""
    if cfg.stage != "1b":
        return None
    template = chat_template(tokenizer)
    return {"template_sha256": hashlib.sha256(template.encode()).hexdigest(), "enable_thinking": True,
            "date": cfg.chat_date if "strftime_now" in template else None, "think_markers": list(cfg.think_markers)}


def render(tokenizer: Any, messages: list[dict[str, str]], cfg: Config) -> str:
    """The conversation as the model reads it: its chat template, thinking on, the date pinned."""
    template, variables = pinned_template(chat_template(tokenizer), cfg.chat_date)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, enable_thinking=True, **variables)


# --- which tokens are kept ------------------------------------------------------------------

def thinking_texts(content: str, markers: list[str]) -> list[str]:
    """The texts strictly between the open and close marker in a message (an unclosed span runs to
    its end); whitespace-only ones, such as the empty block of a no-think answer, are no reasoning."""
    open_, close = markers
    texts = []
    for part in content.split(open_)[1:]:
        text = part.split(close)[0]
        if text.strip():
            texts.append(text)
    return texts


def found_spans(rendered: str, messages: list[dict[str, str]], markers: list[str]) -> tuple[list[tuple[int, int, int]], int]:
    """(message index, start, end) of each thinking text of the assistant messages found in `rendered`
    (character ranges), and how many thinking spans those messages have (more than found: the
    template left some out).

    Each message is looked up in the render after the previous one, so everything the
    template writes before the first message (a system prompt quoting the markers, the date)
    is passed over, and markers the template adds itself never open a span.
    """
    found, spans, cursor = [], 0, 0
    for i, m in enumerate(messages):
        texts = thinking_texts(m["content"], markers) if m["role"] == "assistant" else [m["content"].strip()]
        spans += len(texts) if m["role"] == "assistant" else 0
        for text in texts:
            at = rendered.find(text, cursor) if text else -1
            if at >= 0:
                cursor = at + len(text)
                if m["role"] == "assistant":
                    found.append((i, at, cursor))
    return found, spans


def reasoning_ranges(rendered: str, messages: list[dict[str, str]], markers: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Character ranges of `rendered` that hold the thinking of its assistant messages, and how many
    thinking spans those messages have (`found_spans`)."""
    found, spans = found_spans(rendered, messages, markers)
    return [(start, end) for _, start, end in found], spans


def phase2_bounds(rendered: str, messages: list[dict[str, str]], markers: list[str]) -> tuple[int, int | None] | None:
    """Where phase 2's two regions end in `rendered`: (the character offset of the opening marker of
    the first assistant turn with thinking, the offset just past its closing marker, or None when
    that span is not closed); None when no assistant turn has its thinking in the render.

    LLM-TRM's phase 2 (`src/train/phase2_datagen.py`) renders one user problem with the
    generation prompt and lets the model think: its context is every token before the generated
    `<think>` (system block with its date, the user turn, the assistant header), its target the
    state at `</think>`. A conversation here plays that part with its first assistant turn that
    thinks: the context is everything the render holds before that turn's opening marker (for a
    multi-turn conversation, the earlier turns too: the prompt that turn answers), and later
    turns are not phase 2's. The markers are looked up next to the thinking text the message
    holds, so a system prompt quoting them is never taken for the turn's.
    """
    open_, close = markers
    for _, start, end in found_spans(rendered, messages, markers)[0][:1]:
        if not rendered.startswith(open_, start - len(open_)):  # the template rewrote the marker: no phase-2 turn
            return None
        return start - len(open_), end + len(close) if rendered.startswith(close, end) else None
    return None


# What a stage 1b token is, stored as its index in this tuple (the shards' `region` column; the manifest
# lists the names): phase 2's context (every token before the opening marker of the turn it answers),
# the reasoning (inside any assistant turn's thinking), the state at the end of phase 2's closing
# marker (whose LM-head output is the first answer token), and the rest (answers, later turns).
REGIONS = ("context", "reasoning", "close", "other")
KEPT_REGIONS = {"phase2": ("context", "close"), "thinking": ("reasoning",), "all": REGIONS}


@dataclass
class Tokenized:
    """Token ids of each document (cut at max_seq_length, and after its last kept token), which positions
    reach the shards, the region of each position (stage 1b; None for texts), and per conversation:
    thinking found, what the keep mode keeps cut by max_seq_length, thinking the template dropped."""

    ids: list[list[int]]
    keeps: list[np.ndarray]
    has_thinking: list[bool]
    cut: list[bool]
    dropped: list[bool]
    regions: list[np.ndarray] | None = None


def token_regions(text: str, doc: list[dict[str, str]], offsets: Any, markers: list[str]) -> tuple[np.ndarray, int, bool]:
    """The `REGIONS` index of every token of a rendered conversation, from the tokens' character
    `offsets`; and how many thinking spans were found and whether the template dropped some.

    reasoning: a token whose characters lie inside an assistant turn's thinking (one that straddles a
    span's edge, a marker that is not one token, is not). context: every token before the first one
    that reaches into the opening marker of phase 2's turn (`phase2_bounds`), so exactly the tokens
    phase 2 reads before its `<think>`. close: the token that holds the closing marker's last
    character. Phase 2's comment calls its target the state "after </think>", but its code takes
    index `think_end_pos + len(think_end_ids) - 1`, clamped into the generated states; as generation
    stops at `</think>`, whose own state is never computed, that clamp lands on the token before it,
    whose LM head predicts `</think>`. The state phase 2 decompresses into the LM head for the first
    answer token is the one at the end of `</think>`: that is the one kept here.
    """
    ranges, spans = reasoning_ranges(text, doc, markers)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    region = np.full(len(off), REGIONS.index("other"), dtype=np.int8)
    for start, end in ranges:
        region[(off[:, 0] >= start) & (off[:, 1] <= end) & (off[:, 1] > off[:, 0])] = REGIONS.index("reasoning")
    bounds = phase2_bounds(text, doc, markers)
    if bounds is not None:
        open_at, close_end = bounds
        region[:int(np.argmax(off[:, 1] > open_at)) if (off[:, 1] > open_at).any() else len(off)] = REGIONS.index("context")
        if close_end is not None and (off[:, 1] >= close_end).any():
            region[int(np.argmax(off[:, 1] >= close_end))] = REGIONS.index("close")
    return region, len(ranges), len(ranges) < spans


def tokenize(tokenizer: Any, docs: list[Any], cfg: Config) -> Tokenized:
    """Token ids of each document, and which of its positions to keep.

    A text (stage 1a) keeps every token. A conversation (stage 1b) is rendered by `render`, its
    tokens' regions are found by `token_regions` in the render through the fast tokenizer's
    offsets, and a token is kept when its region is one --keep_tokens keeps (`KEPT_REGIONS`).
    This needs no `{% generation %}` tag (which the assistant-mask route needs, and many
    templates lack) and no re-rendering of prefixes (which breaks on templates that rewrite
    earlier turns), and it cannot pick up text the template adds. A region cut off by
    max_seq_length is kept up to the cut. Under causal attention no later token changes a kept
    state, so a conversation's tokens end at its last kept one: the model never runs over the
    answers phase 2 (or the reasoning mode) does not read.
    """
    if not docs or not isinstance(docs[0], list):
        ids = tokenizer(list(docs), truncation=True, max_length=cfg.max_seq_length)["input_ids"]
        none = [False] * len(ids)
        return Tokenized(ids, [np.ones(len(t), dtype=bool) for t in ids], none, none, none)
    texts = [render(tokenizer, d, cfg) for d in docs]
    if not tokenizer.is_fast:
        raise UserError(f"stage 1b maps conversations to tokens by character offsets, which needs a fast tokenizer; {cfg.model_name}'s is not")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    kept = np.isin(np.arange(len(REGIONS)), [REGIONS.index(r) for r in KEPT_REGIONS[cfg.kept_tokens]])
    # What counts as cut: the thinking (thinking, all), or phase 2's regions (phase2).
    wanted = kept if cfg.kept_tokens == "phase2" else np.arange(len(REGIONS)) == REGIONS.index("reasoning")
    out = Tokenized([], [], [], [], [], [])
    for text, doc, ids, offsets in zip(texts, docs, enc["input_ids"], enc["offset_mapping"]):
        region, found, dropped = token_regions(text, doc, offsets, cfg.think_markers)
        keep = kept[region]
        n = min(cfg.max_seq_length, int(np.flatnonzero(keep)[-1]) + 1 if keep.any() else len(ids))
        out.ids.append(ids[:n])
        out.keeps.append(keep[:n])
        out.regions.append(region[:n])
        out.has_thinking.append(found > 0)
        out.cut.append(bool(wanted[region[cfg.max_seq_length:]].any()))
        out.dropped.append(dropped)
    return out


def thinking_summary(tok: Tokenized | Iterable[Tokenized], cfg: Config) -> str:
    """One line on what stage 1b keeps; a UserError when no conversation has thinking to keep.
    Given the conversations' tokens in parts (`extract.summarize`), it holds one part at a time."""
    n = found = cut = dropped = kept = closes = 0
    for part in [tok] if isinstance(tok, Tokenized) else tok:
        n, found, cut, dropped = n + len(part.ids), found + sum(part.has_thinking), cut + sum(part.cut), dropped + sum(part.dropped)
        kept += sum(int(k.sum()) for k, t in zip(part.keeps, part.has_thinking) if t)
        closes += sum(bool((r == REGIONS.index("close")).any()) for r in part.regions or [])
    where = f"{' ... '.join(cfg.think_markers)} in the assistant turns of the {cfg.messages_field!r} field"
    dropped_text = f"; the chat template leaves out the thinking of {dropped}" if dropped else ""
    if found == 0 and cfg.kept_tokens != "all":
        raise UserError(f"none of the {n} conversations has a thinking span ({where}){dropped_text}: "
                        "set --think_markers or --messages_field, or pass --keep_tokens all")
    what = "phase 2's regions" if cfg.kept_tokens == "phase2" else "it"
    closed = f", {closes} with the closing marker's state (phase 2's target)" if cfg.kept_tokens == "phase2" else ""
    return (f"{n} conversations read, {found} with a thinking span ({where}), "
            f"{cut} with {what} cut by max_seq_length {cfg.max_seq_length}{closed}, "
            f"{kept / max(found, 1):,.1f} kept tokens per conversation with a span{dropped_text}")
