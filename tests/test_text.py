"""Text -> tokens for stage 1b, on SmolLM3's real chat template (tests/data/smollm3_chat_template.jinja,
the `chat_template` of HuggingFaceTB/SmolLM3-3B's tokenizer_config.json, Apache-2.0) carried by a word-level tokenizer."""

import datetime
import json
import re
from pathlib import Path

import numpy as np
import pytest

from trm_ray.config import UserError, load_yaml, make_config
from trm_ray.extract import extract, extraction_settings
from trm_ray.quickstart import make_conversations, make_tokenizer
from trm_ray.files import write_json
from trm_ray.shards import MANIFEST
from trm_ray.text import REGIONS, chat_settings, pinned_template, read_documents, render, thinking_summary, tokenize

SMOLLM3_TEMPLATE = (Path(__file__).parent / "data" / "smollm3_chat_template.jinja").read_text()

PLAIN = [  # OpenR1-Math's shape: one user and one assistant turn, no system message
    {"role": "user", "content": "what is 2 plus 3 ?"},
    {"role": "assistant", "content": "<think>\nfirst 2 plus 3 equals 5 .\n</think>\nthe answer is 5 ."},
]
NO_THINK_SYSTEM = [  # the template writes an empty <think></think> block before the answer
    {"role": "system", "content": "you are a teacher . /no_think"},
    {"role": "user", "content": "what is 4 times 2 ?"},
    {"role": "assistant", "content": "<think>\n4 times 2 equals 8 .\n</think>\nthe answer is 8 ."},
]
TWO_ROUNDS = [
    {"role": "user", "content": "what is 9 minus 3 ?"},
    {"role": "assistant", "content": "<think> 9 minus 3 equals 6 . </think> 6 ."},
    {"role": "user", "content": "and then plus 1 ?"},
    {"role": "assistant", "content": "<think> then 6 plus 1 equals 7 . </think> 7 ."},
]
NO_THINKING = [{"role": "user", "content": "what is 1 plus 1 ?"}, {"role": "assistant", "content": "the answer is 2 ."}]


@pytest.fixture(scope="module")
def smollm3_tokenizer():
    """Word-level vocabulary (the template's own words included); <|im_start|>, <|im_end|>, <think>
    and </think> are single special tokens, as in SmolLM3's tokenizer."""
    return make_tokenizer(SMOLLM3_TEMPLATE, re.findall(r"[a-z]+", SMOLLM3_TEMPLATE.lower()) + ["begin", "end", "solution"])


def stage1b(**values):
    """Stage 1b in the reasoning-span mode unless told otherwise (most of what is checked here is its spans)."""
    return make_config({"stage": "1b", "model_name": "smollm3-template", "max_seq_length": 1024, "keep_tokens": "thinking",
                        **values})


def span_ids(tokenizer, conversation, markers=("<think>", "</think>")):
    """Token ids of the reasoning the assistant messages hold, read off the messages themselves."""
    ids = []
    for m in conversation:
        if m["role"] == "assistant" and markers[0] in m["content"]:
            inside = m["content"].split(markers[0])[1].split(markers[1])[0]
            ids += tokenizer(inside, add_special_tokens=False)["input_ids"]
    return ids


def test_smollm3_template_keeps_exactly_the_assistant_reasoning(smollm3_tokenizer):
    tok = smollm3_tokenizer
    conversations = [PLAIN, NO_THINK_SYSTEM, TWO_ROUNDS, NO_THINKING]
    out = tokenize(tok, conversations, stage1b())
    think, user = tok.convert_tokens_to_ids(["<think>", "<|im_start|>"])
    for conv, ids, keep in zip(conversations, out.ids, out.keeps):
        assert np.asarray(ids)[keep].tolist() == span_ids(tok, conv)
        # The trap is there: the default system prompt quotes <think> ... </think> (a <think> token)
        # before the first user turn, and none of the system block is kept.
        first_turn = [i for i, t in enumerate(ids) if t == user][1]  # the turn after the system block
        assert conv is NO_THINK_SYSTEM or think in ids[:first_turn]
        assert not keep[:first_turn].any()
    # No-think mode's empty block is rendered, and not kept.
    assert "<think>\n\n</think>\n<think>\n4 times 2" in render(tok, NO_THINK_SYSTEM, stage1b())
    assert out.has_thinking == [True, True, True, False] and out.cut == [False] * 4


def test_sharegpt_conversations_are_converted_and_kept_alike(smollm3_tokenizer, tmp_path):
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    with open(tmp_path / "sharegpt.jsonl", "w") as f:
        for conv in (PLAIN, NO_THINK_SYSTEM, TWO_ROUNDS):
            f.write(json.dumps({"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in conv]}) + "\n")
    cfg = stage1b(dataset=str(tmp_path / "sharegpt.jsonl"), messages_field="conversations")
    docs = read_documents(cfg)
    assert docs == [PLAIN, NO_THINK_SYSTEM, TWO_ROUNDS]
    got, want = tokenize(smollm3_tokenizer, docs, cfg), tokenize(smollm3_tokenizer, [PLAIN, NO_THINK_SYSTEM, TWO_ROUNDS], stage1b())
    assert got.ids == want.ids
    assert [k.tolist() for k in got.keeps] == [k.tolist() for k in want.keeps]


def test_messages_of_another_shape_are_a_one_line_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"speaker": "a", "text": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"must be \{role, content\} or ShareGPT \{from, value\}, got \['speaker', 'text'\]"):
        read_documents(stage1b(dataset=str(tmp_path / "bad.jsonl")))


def test_custom_think_markers_keep_only_the_thought(smollm3_tokenizer):
    markers = ["<|begin_of_thought|>", "<|end_of_thought|>"]
    conv = [{"role": "user", "content": "what is 2 plus 3 ?"},
            {"role": "assistant", "content": "<|begin_of_thought|>\n\nfirst 2 plus 3 equals 5 .\n\n<|end_of_thought|>\n\n"
                                             "<|begin_of_solution|>\n\nthe answer is 5 .\n\n<|end_of_solution|>"}]
    out = tokenize(smollm3_tokenizer, [conv], stage1b(think_markers=markers))
    kept = np.asarray(out.ids[0])[out.keeps[0]].tolist()
    assert kept == span_ids(smollm3_tokenizer, conv, markers)
    assert smollm3_tokenizer.decode(kept) == "first 2 plus 3 equals 5 ."
    # With the default markers the same data has no thinking: said in one line, naming what was looked for.
    with pytest.raises(UserError, match=r"none of the 1 conversations has a thinking span \(<think> \.\.\. </think> "
                                        r"in the assistant turns of the 'messages' field\)"):
        thinking_summary(tokenize(smollm3_tokenizer, [conv], stage1b()), stage1b())


def test_rendering_is_pinned_to_chat_date_not_today(smollm3_tokenizer):
    today = datetime.date.today().strftime("%d %B %Y")
    text = render(smollm3_tokenizer, PLAIN, stage1b(chat_date="2025-07-08"))
    assert "Today Date: 08 July 2025\n" in text and today not in text
    assert "Today Date: 02 January 2024\n" in render(smollm3_tokenizer, PLAIN, stage1b(chat_date="2024-01-02"))
    # The manifest's record of the rendering changes with the date and with the template.
    pinned = chat_settings(smollm3_tokenizer, stage1b(chat_date="2025-07-08"))
    assert pinned["date"] == "2025-07-08" and pinned["enable_thinking"] is True
    assert chat_settings(smollm3_tokenizer, stage1b(chat_date="2024-01-02")) != pinned
    assert chat_settings(make_tokenizer(), stage1b())["template_sha256"] != pinned["template_sha256"]
    assert chat_settings(make_tokenizer(), stage1b())["date"] is None  # a template without strftime_now: no date
    with pytest.raises(UserError, match="chat_date must be a date as YYYY-MM-DD"):
        stage1b(chat_date="July 8")


def test_summary_counts_spans_cut_by_max_seq_length():
    tok, convs = make_tokenizer(), make_conversations(30)
    cfg = stage1b(max_seq_length=48)
    out = tokenize(tok, convs, cfg)
    full = [tok.apply_chat_template(c, tokenize=True, enable_thinking=True)["input_ids"] for c in convs]
    open_id, close_id = tok.convert_tokens_to_ids(["<think>", "</think>"])
    # The quickstart's reasoning is the tokens between the assistant's <think> and </think>.
    spans = [(ids.index(open_id) + 1, ids.index(close_id)) for ids in full]
    assert out.cut == [end > 48 for _, end in spans] and 0 < sum(out.cut) < 30
    kept = [min(end, 48) - start for start, end in spans]
    assert [int(k.sum()) for k in out.keeps] == kept
    assert thinking_summary(out, cfg) == (
        f"30 conversations read, 30 with a thinking span (<think> ... </think> in the assistant turns of the 'messages' "
        f"field), {sum(out.cut)} with it cut by max_seq_length 48, {sum(kept) / 30:,.1f} kept tokens per conversation with a span")


def test_shards_of_another_chat_template_are_refused(assets, tmp_path):
    cfg = make_config({"stage": "1b", "model_name": assets["model"], "dataset": assets["reasoning"],
                       "shards_dir": str(tmp_path), "storage_dtype": "float32"})
    other = chat_settings(make_tokenizer(SMOLLM3_TEMPLATE), cfg)
    write_json(str(tmp_path / MANIFEST), extraction_settings(cfg, 64, "float32", other))
    with pytest.raises(UserError, match=r"other settings \(chat differ\)"):
        extract(cfg)


def test_extraction_of_conversations_without_thinking_stops_before_the_model_runs(assets, tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": NO_THINKING}) + "\n" for _ in range(3)))
    cfg = make_config({"stage": "1b", "model_name": assets["model"], "dataset": str(tmp_path / "chat.jsonl"),
                       "shards_dir": str(tmp_path / "shards"), "storage_dtype": "float32"})
    with pytest.raises(UserError, match=r"none of the 3 conversations has a thinking span"):
        extract(cfg)
    assert not (tmp_path / "shards" / "extraction.json").exists()


def test_a_template_that_drops_the_thinking_is_named_in_the_error():
    # Like DeepSeek-R1's template: an assistant turn is rendered without what precedes </think>.
    drops = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'].split('</think>')[-1] }}<|im_end|> "
             "{% endfor %}")
    out = tokenize(make_tokenizer(drops), [PLAIN, TWO_ROUNDS], stage1b())
    assert out.has_thinking == [False, False] and out.dropped == [True, True]
    with pytest.raises(UserError, match=r"the 'messages' field\); the chat template leaves out the thinking of 2: set"):
        thinking_summary(out, stage1b())


def test_an_unquoted_chat_date_in_yaml_is_read_as_the_date(tmp_path):
    (tmp_path / "run.yaml").write_text("stage: 1b\nchat_date: 2024-01-02\n")  # YAML reads it as a datetime.date
    assert make_config(load_yaml(tmp_path / "run.yaml")).chat_date == "2024-01-02"


def test_phase2_mode_keeps_the_context_before_the_assistants_think_and_the_state_at_its_close(smollm3_tokenizer):
    """Region by region, what LLM-TRM's phase 2 reads: every token before the generated <think> of a
    prompt rendered with the generation prompt, and the state at the end of </think>."""
    tok, cfg = smollm3_tokenizer, stage1b(keep_tokens="phase2")
    think, close, assistant = tok.convert_tokens_to_ids(["<think>", "</think>", "assistant"])
    out = tokenize(tok, [PLAIN, TWO_ROUNDS], cfg)
    for conv, ids, keep, region in zip([PLAIN, TWO_ROUNDS], out.ids, out.keeps, out.regions):
        ids = np.asarray(ids)
        # Phase 2's context is its prompt: the user turn with the generation prompt, thinking on, the date pinned.
        template, variables = pinned_template(SMOLLM3_TEMPLATE, cfg.chat_date)
        prompt = tok.apply_chat_template(conv[:1], chat_template=template, add_generation_prompt=True,
                                         enable_thinking=True, tokenize=False, **variables)
        context = tok(prompt, add_special_tokens=False)["input_ids"]
        n = len(context)
        assert ids[n - 1] == assistant and ids[n] == think  # the header, then the assistant's own <think>
        assert (region[:n] == REGIONS.index("context")).all() and ids[:n].tolist() == context
        assert think in context  # the system prompt's quoted <think> is context, not the turn's marker
        # The close state is the first turn's </think>, the last token run: no answer, no later turn.
        assert ids[-1] == close and region[-1] == REGIONS.index("close") and close not in ids[n:-1]
        assert (region[n + 1:-1] == REGIONS.index("reasoning")).all() and ids[n + 1:-1].tolist() == span_ids(tok, conv[:2])
        assert np.flatnonzero(keep).tolist() == [*range(n), len(ids) - 1]
    assert out.has_thinking == [True, True] and out.cut == [False, False]
    # Thinking mode keeps the reasoning region alone, of every turn; its shards record the same regions.
    thinking = tokenize(tok, [TWO_ROUNDS], stage1b())
    assert set(thinking.regions[0][thinking.keeps[0]].tolist()) == {REGIONS.index("reasoning")}
    assert np.asarray(thinking.ids[0])[thinking.keeps[0]].tolist() == span_ids(tok, TWO_ROUNDS)


def byte_level_bpe(chat_template: str, texts: list[str]):
    """A GPT-2-style byte-level BPE (SmolLM3's kind: tokens are bytes merged, so a character can be split across
    tokens), trained here on `texts`; the chat markers are single special tokens, as in SmolLM3's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", chat_template=chat_template,
                                   additional_special_tokens=specials[:4])


def test_a_byte_level_bpe_keeps_exactly_the_reasoning_tokens_also_of_characters_split_across_bytes():
    # Multi-byte characters (×, →, é, an emoji) become several byte tokens that share one character offset.
    convs = [PLAIN, TWO_ROUNDS, [
        {"role": "user", "content": "combien font 3 × 4 ?"},
        {"role": "assistant", "content": "<think>\n3 × 4 → 12, déjà vu 😀 .\n</think>\nla réponse est 12 ."}]]
    texts = [SMOLLM3_TEMPLATE] + [m["content"] for c in convs for m in c]
    tok = byte_level_bpe(SMOLLM3_TEMPLATE, texts)
    out = tokenize(tok, convs, stage1b())
    assert any(len(tok(ch, add_special_tokens=False)["input_ids"]) > 1 for ch in "×→é😀")  # really split
    for conv, ids, keep in zip(convs, out.ids, out.keeps):
        assert np.asarray(ids)[keep].tolist() == span_ids(tok, conv)


def test_stage_1b_summary_tokenizes_one_shard_of_conversations_at_a_time(smollm3_tokenizer, monkeypatch):
    import trm_ray.extract as extract_mod

    convs = make_conversations(50)
    cfg = stage1b(docs_per_shard=8, max_seq_length=48)
    sizes = []

    def recording(tokenizer, docs, cfg):
        sizes.append(len(docs))
        return tokenize(tokenizer, docs, cfg)

    monkeypatch.setattr(extract_mod, "tokenize", recording)
    assert extract_mod.summarize(smollm3_tokenizer, convs, cfg) == thinking_summary(tokenize(smollm3_tokenizer, convs, cfg), cfg)
    assert sizes == [8] * 6 + [2]  # never every conversation's tokens and offsets at once
