"""Make the offline quickstart's inputs: a tiny SmolLM3-architecture model and small corpora.

The model is trained for a few seconds on its own corpus, so its LM head and hidden states
are those of a (tiny) language model rather than of random weights.

Both are written as ordinary files (a `save_pretrained` model directory with its own
tokenizer, a jsonl corpus) so that the quickstart and the tests load them through exactly
the code path the production model and dataset take. Nothing here touches a hub.

    python -m trm_ray.quickstart            # writes ./quickstart_assets/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SmolLM3Config, SmolLM3ForCausalLM

from trm_ray.loop import one_thread

ADJECTIVES = "small large quiet bright old young green cold warm heavy light early late red blue".split()
NOUNS = "river teacher student city forest engine planet library garden market cell signal window bridge farmer".split()
VERBS = "finds builds studies moves carries explains measures follows opens watches".split()
PLACES = "school harbor valley station museum kitchen field tower".split()
WORDS = sorted(set(ADJECTIVES + NOUNS + VERBS + PLACES + "the a near in of and then it is what plus minus times equals answer so first user assistant system".split()))
SPECIAL = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SYMBOLS = list("0123456789.,?+-*=:()")

# Thinking is always on for stage 1b data: the assistant turn opens with its reasoning.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer(chat_template: str = CHAT_TEMPLATE, extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the generator's vocabulary: real, deterministic, instant.
    Another chat template (a real model's, in the tests) can come with the words it writes."""
    words = sorted(set(WORDS) | {w.lower() for w in extra_words} - set(SPECIAL + SYMBOLS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + SYMBOLS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        chat_template=chat_template,
        padding_side="right",
    )


def make_model(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, seed: int = 0) -> SmolLM3ForCausalLM:
    """SmolLM3 architecture (GQA, NoPE every 4th layer, tied embeddings) at toy width."""
    torch.manual_seed(seed)
    config = SmolLM3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.1,
    )
    model = SmolLM3ForCausalLM(config).eval()
    # Random weights give a nearly isotropic last layer; real LMs have a steep spectrum.
    # A decaying final-norm gain gives the toy model one, so D' matters as it does at 3B.
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.logspace(0.5, -1.5, hidden_size))
    return model


def train_briefly(model: SmolLM3ForCausalLM, tokenizer: PreTrainedTokenizerFast, docs: list[str], steps: int = 150,
                  seed: int = 0) -> SmolLM3ForCausalLM:
    """A few seconds of next-token training on the corpus, so the LM head and the hidden states are
    a real model's: confident where the template fixes the next word, unsure where it is drawn at
    random. A random head would make the downstream KL (and a compressor trained on it) meaningless."""
    torch.manual_seed(seed)
    ids = tokenizer(docs, truncation=True, max_length=64, padding=True, return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with one_thread():
        for _ in range(steps):
            batch = torch.randint(0, len(docs), (8,), generator=gen)
            loss = model(input_ids=ids["input_ids"][batch], attention_mask=ids["attention_mask"][batch], labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def make_documents(num_docs: int, seed: int = 0) -> list[str]:
    """Template sentences over a fixed vocabulary, 2-8 sentences a document."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 8)):
            a, b = rng.sample(NOUNS, 2)
            sentences.append(
                f"the {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {b} "
                f"near the {rng.choice(PLACES)} in {rng.randint(1, 2000)}."
            )
        docs.append(" ".join(sentences))
    return docs


def make_conversations(num_docs: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Step-by-step arithmetic with its reasoning in a <think> span: the stage 1b corpus."""
    rng = random.Random(seed)
    names = {"+": "plus", "-": "minus", "*": "times"}
    convs = []
    for _ in range(num_docs):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        first = eval(f"{a}{op1}{b}")
        total = eval(f"{first}{op2}{c}")
        thinking = (f"<think> first {a} {names[op1]} {b} equals {first} . then {first} {names[op2]} {c} "
                    f"equals {total} . so the answer is {total} . </think>")
        convs.append([
            {"role": "user", "content": f"what is ( {a} {op1} {b} ) {op2} {c} ?"},
            {"role": "assistant", "content": f"{thinking} the answer is {total} ."},
        ])
    return convs


def write_assets(out_dir: str | Path, num_docs: int = 400, hidden_size: int = 64) -> dict[str, str]:
    """Write the model directory, the text corpus (1a) and the reasoning corpus (1b); returns their paths."""
    out = Path(out_dir)
    model_dir = out / "tiny-smollm3"
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(model_dir)
    docs = make_documents(num_docs)
    train_briefly(make_model(tokenizer, hidden_size), tokenizer, docs).save_pretrained(model_dir)
    corpus = out / "corpus.jsonl"
    with corpus.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    reasoning = out / "reasoning.jsonl"
    with reasoning.open("w") as f:
        for conv in make_conversations(num_docs):
            f.write(json.dumps({"messages": conv}) + "\n")
    return {"model": str(model_dir), "corpus": str(corpus), "reasoning": str(reasoning)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trm_ray.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="./quickstart_assets")
    parser.add_argument("--num_docs", type=int, default=400)
    args = parser.parse_args()
    paths = write_assets(args.out_dir, args.num_docs)
    for name, path in paths.items():
        print(f"quickstart {name}: {path}")


if __name__ == "__main__":
    main()
