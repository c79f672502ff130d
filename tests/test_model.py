"""trm_ray.model: any causal LM's layer as its own hidden_states[i], and its LM head alone giving its own logits."""

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

from trm_ray import kl as kl_module
from trm_ray.config import UserError
from trm_ray.kl import logit_shift, mean_fisher, next_token_kl
from trm_ray.extract import hidden_rows
from trm_ray import model as model_module
from trm_ray.kl import LMHead, log_probs
from trm_ray.model import (MULTIPLY, NoLMHead, check_lm_head, cut_or_whole, flops_per_token, load_lm_head,
                           load_model_config)

SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
KV = dict(SMALL, num_key_value_heads=2)


def configs() -> dict[str, transformers.PretrainedConfig]:
    """Tiny configs of decoders whose blocks, final norms and heads go by different names."""
    return {
        "llama": transformers.LlamaConfig(**KV),
        "gpt2": transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=4, n_head=4, n_positions=64),
        "gpt_neox": transformers.GPTNeoXConfig(**SMALL, tie_word_embeddings=False),
        # project_out after the final norm: no cut gives hidden_states[i] < 4, the whole model does.
        "opt_project_out": transformers.OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                  ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=16),
        "gemma2_softcapped": transformers.Gemma2Config(**KV, head_dim=8, final_logit_softcapping=2.0),
        "gemma3": transformers.Gemma3TextConfig(**KV, head_dim=8, final_logit_softcapping=3.0),
        "qwen2": transformers.Qwen2Config(**KV, tie_word_embeddings=False),
        "phi_head_bias": transformers.PhiConfig(**SMALL),
        "falcon": transformers.FalconConfig(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
        "cohere_scaled": transformers.CohereConfig(**KV, logit_scale=0.25),
        "granite_scaled": transformers.GraniteConfig(**KV, logits_scaling=4.0),
        "falcon_h1_scaled": transformers.FalconH1Config(**KV, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                                        mamba_d_state=8, mamba_chunk_size=8, lm_head_multiplier=0.25),
    }


def tokens(vocab: int) -> list[list[int]]:
    """Three documents of different lengths: batched together they are right-padded."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (11, 5, 8)]


@pytest.mark.parametrize("layer", [0, 2, -1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("name", list(configs()))
def test_every_layer_of_each_architecture_is_extracted_as_its_hidden_states(name, layer):
    torch.manual_seed(0)
    config = configs()[name]
    full = AutoModel.from_config(config).eval()
    expected = [full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].detach()
                for ids in tokens(config.vocab_size)]
    model, how = cut_or_whole(full, layer)
    hidden, docs, _ = hidden_rows(model, tokens(config.vocab_size), 0, tokens_per_batch=64, max_batch=3)
    for doc, want in enumerate(expected):
        torch.testing.assert_close(hidden[torch.from_numpy(docs == doc)], want, atol=1e-5, rtol=1e-5)
    assert how == ("hidden_states" if name == "opt_project_out" and layer != -1 else "blocks")
    if how == "blocks" and layer != -1:  # the later blocks are gone, not merely skipped
        assert sum(isinstance(m, torch.nn.ModuleList) and len(m) == layer for m in model.modules()) == 1


def test_the_flops_of_a_cut_count_only_the_blocks_up_to_the_layer():
    config = configs()["gpt2"]
    per_block = 2 * sum(p.numel() for p in AutoModel.from_config(config).h[0].parameters())
    assert flops_per_token(config, 3) - flops_per_token(config, 1) == pytest.approx(2 * per_block)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Each tiny causal LM saved with save_pretrained, random weights (the GPT-NeoX one in shards)."""
    out = {}
    for name, config in configs().items():
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # logits large enough that soft-capping and scaling change them
            model.get_output_embeddings().weight.mul_(30)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="100KB" if name == "gpt_neox" else "50GB")
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", list(configs()))
def test_the_head_alone_gives_the_models_own_logits(saved, name):
    model = AutoModelForCausalLM.from_pretrained(saved[name]).eval()
    ids = torch.tensor(tokens(model.config.vocab_size)[:1])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    head = load_lm_head(saved[name], torch.device("cpu"))
    assert (head.out_features, head.in_features) == tuple(model.get_output_embeddings().weight.shape)
    assert (head.bias is not None) == (name == "phi_head_bias")
    assert head.affine == ("softcapped" not in name and name != "gemma3")
    torch.testing.assert_close(head(out.hidden_states[-1]), out.logits, atol=2e-5, rtol=1e-5)
    assert check_lm_head(saved[name])  # and the probe a sweep starts with agrees


def test_a_head_whose_logits_trm_ray_does_not_reproduce_is_refused_in_one_line(saved, tmp_path, monkeypatch):
    # BERT's masked-LM head runs a dense layer and a norm before its output embedding: not a logit transform.
    transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match=f"the LM head trm_ray reads from {re.escape(str(tmp_path / 'bert'))} .* does not "
                                        "give the model's own logits: they differ by") as err:
        check_lm_head(str(tmp_path / "bert"))
    assert "\n" not in str(err.value)
    # Falcon-H1's multiplier unknown to trm_ray: its head would be read unscaled, and is refused instead.
    monkeypatch.setattr(model_module, "MULTIPLY", tuple(n for n in MULTIPLY if n != "lm_head_multiplier"))
    with pytest.raises(UserError, match=r"\(in_features=32, out_features=256, scale=1, softcap=None\) does not give"):
        check_lm_head.__wrapped__(saved["falcon_h1_scaled"])  # past the cache, which holds this path's verdict


def test_a_model_saved_without_its_lm_head_has_none_to_score(tmp_path):
    transformers.BertModel(transformers.BertConfig(**SMALL)).save_pretrained(tmp_path)  # a sentence encoder
    with pytest.raises(NoLMHead, match="it has no LM head"):
        load_lm_head(str(tmp_path), torch.device("cpu"))
    assert check_lm_head(str(tmp_path)) is False


def test_the_sharded_checkpoint_and_the_untied_head_are_read_from_their_own_tensor(saved):
    index = json.load(open(f"{saved['gpt_neox']}/model.safetensors.index.json"))["weight_map"]
    assert len(set(index.values())) > 1 and "embed_out.weight" in index
    model = AutoModelForCausalLM.from_pretrained(saved["gpt_neox"])
    head = load_lm_head(saved["gpt_neox"], torch.device("cpu"))
    assert torch.equal(head.weight, model.lm_head.weight)  # stored under its original name, embed_out
    assert not torch.equal(head.weight, model.get_input_embeddings().weight)


def test_a_bin_checkpoint_gives_the_same_head(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved["gpt2"])
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    head = load_lm_head(str(tmp_path), torch.device("cpu"), torch.bfloat16)
    assert head.weight.dtype == torch.bfloat16
    assert torch.equal(head.weight, model.lm_head.weight.bfloat16())


def test_a_logit_change_trm_ray_cannot_reproduce_is_a_one_line_error(tmp_path):
    transformers.LlamaConfig(**KV, unpadded_vocab_size=200).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unpadded_vocab_size=200") as err:
        load_lm_head(str(tmp_path), torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_an_encoder_decoder_is_refused_in_one_line(tmp_path):
    transformers.BartConfig().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="encoder-decoder") as err:
        load_model_config(str(tmp_path))
    assert "\n" not in str(err.value)


def softcapped_head(scale: float = 1.0) -> LMHead:
    gen = torch.Generator().manual_seed(0)
    return LMHead(torch.randn(300, 24, generator=gen), torch.randn(300, generator=gen), scale=scale, softcap=4.0)


def exact_kl(head: LMHead, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ KL(p(x) || p(x_hat)) in float64 through the head's own forward, the reference for the fused code."""
    head64 = LMHead(head.weight.double(), None if head.bias is None else head.bias.double(), head.scale, head.softcap)
    logp = torch.log_softmax(head64.transform(head64.raw(x.double())), -1)
    logq = torch.log_softmax(head64.transform(head64.raw(x_hat)), -1)
    return (logp.exp() * (logp - logq)).sum()


@pytest.mark.parametrize("head", [softcapped_head(), softcapped_head(scale=0.5), LMHead(softcapped_head().weight, None, 0.25)],
                         ids=["softcapped", "scaled-softcapped", "scaled-affine"])
def test_the_fused_kl_and_its_gradient_through_a_transformed_head_equal_autograd(head, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(90, 24, generator=gen)
    x_hat = (x + 0.3 * torch.randn(90, 24, generator=gen)).requires_grad_(True)
    assert float((head.raw(x) * head.scale).abs().max()) > 2 * (head.softcap or 0)  # deep into the cap where there is one
    monkeypatch.setattr(kl_module, "KL_CHUNK_ELEMENTS", 40 * head.out_features)  # 3 chunks, the last one short
    fused = next_token_kl(head, x, x_hat)
    fused.backward()
    x_hat64 = x_hat.detach().double().requires_grad_(True)
    exact = exact_kl(head, x, x_hat64)
    exact.backward()
    torch.testing.assert_close(fused, exact.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x_hat.grad, x_hat64.grad.float(), rtol=1e-4, atol=1e-6)
    logp, r, kl = logit_shift(head, x, x_hat.detach())  # log q = log p + r - KL, row by row
    torch.testing.assert_close(logp + r - kl[:, None], log_probs(head, x_hat.detach()), rtol=0, atol=1e-4)


def test_the_mean_fisher_of_a_softcapped_head_gives_the_kl_of_a_small_step_to_second_order():
    head = softcapped_head()
    x = 2 * torch.randn(200, 24, generator=torch.Generator().manual_seed(2))
    fisher, n = mean_fisher(head, [x[:120], x[120:]])
    assert n == 200
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(24, generator=gen, dtype=torch.float64)
        v = 1e-3 * v / v.norm()
        kl = float(exact_kl(head, x, x.double() + v)) / len(x)
        assert kl == pytest.approx(0.5 * float(v @ fisher @ v), rel=1e-2)


def test_the_head_of_a_3b_shaped_model_costs_the_worker_the_heads_memory_not_the_models(tmp_path):
    """SmolLM3-3B's vocabulary and width, 4 layers, bf16 random weights: 1.7 GB on disk, a 0.5 GB head."""
    config = transformers.SmolLM3Config(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=4,
                                        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_bytes = model.lm_head.weight.numel() * 2
    model.save_pretrained(tmp_path)
    del model
    # A fresh process, as a training worker is: its peak resident memory (VmHWM: ru_maxrss would carry this
    # process's over the exec) grows by what the head takes. The weight is summed, so every page of it is resident.
    script = (f"import re, torch, transformers\nfrom trm_ray.model import load_lm_head\n"
              f"peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
              f"before = peak()\n"
              f"head = load_lm_head({str(tmp_path)!r}, torch.device('cpu'), torch.bfloat16)\n"
              f"assert torch.isfinite(head.weight.sum())\n"
              f"print(head.weight.shape[0], peak() - before)")
    vocab, grown = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
                       .stdout.split())
    assert vocab == 128256 and model_bytes > 3 * head_bytes
    assert grown < 1.5 * head_bytes  # the head, not the 3.2x larger model
