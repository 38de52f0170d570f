"""The real offline models: SmolLM2-135M-Instruct (llama arch) and Qwen2.5-Coder-0.5B-Instruct (qwen2 arch).

Reference numbers, measured once (float32, 2 CPU threads) on the first 1024 tokens of the committed Jargon File
slice: keepkv perplexity 30.1194; transformers 5.24 on the same GGUF 30.1194 (max |logit diff| 7e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.real_model
TEXT = (Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt").read_text()
SMOLLM2_JARGON_PPL = 30.1194
PPL_TOKENS = 1024


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).exp())


@pytest.fixture(scope="module")
def jargon_ids(smollm2_eager):
    return torch.tensor([smollm2_eager.tokenizer.encode(TEXT)[:PPL_TOKENS]])


@pytest.fixture(scope="module")
def smollm2_logits(smollm2_eager, jargon_ids):
    return smollm2_eager.logits(jargon_ids)


def test_smollm2_shape(smollm2_eager):
    c = smollm2_eager.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        ("llama", 30, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and smollm2_eager.network.lm_head.weight is \
        smollm2_eager.network.model.embed_tokens.weight


def test_smollm2_perplexity_matches_the_measured_reference(smollm2_logits, jargon_ids):
    assert perplexity(smollm2_logits, jargon_ids) == pytest.approx(SMOLLM2_JARGON_PPL, rel=0.01)


def test_smollm2_perplexity_matches_transformers(hf_smollm2, smollm2_logits, jargon_ids):
    """Within 1% of Hugging Face transformers on the same GGUF file (test-only reference)."""
    with torch.no_grad():
        reference_logits = hf_smollm2(jargon_ids).logits
    assert perplexity(smollm2_logits, jargon_ids) == pytest.approx(perplexity(reference_logits, jargon_ids), rel=0.01)
    assert (reference_logits - smollm2_logits).abs().max() < 1e-3


def test_smollm2_greedy_generation_is_coherent(smollm2_eager):
    assert "Paris" in smollm2_eager.generate("The capital of France is", max_new_tokens=8)
    answer = smollm2_eager.generate("What is the capital of Germany? Answer in one word.", max_new_tokens=12,
                                    chat=True)
    assert "Berlin" in answer


def test_smollm2_bfloat16_tracks_float32(smollm2_gguf, smollm2_logits, jargon_ids):
    from keepkv.models import load

    model = load(smollm2_gguf, dtype="bfloat16", compile=False, device="cpu")
    assert model.network.model.embed_tokens.weight.dtype == torch.bfloat16
    logits = model.logits(jargon_ids[:, :256])
    assert torch.isfinite(logits).all()
    assert perplexity(logits, jargon_ids[:, :256]) == pytest.approx(
        perplexity(smollm2_logits[:, :256], jargon_ids[:, :256]), rel=0.05
    )


def test_qwen2_loads_and_writes_code(qwen_eager):
    model = qwen_eager
    c = model.config
    assert (c.arch, c.num_heads, c.num_kv_heads, c.attention_bias) == ("qwen2", 14, 2, True)
    assert c.max_position_embeddings >= 32768
    code = model.generate("Write a Python function that returns the square of x.", max_new_tokens=40, chat=True)
    assert "def " in code and "return" in code
