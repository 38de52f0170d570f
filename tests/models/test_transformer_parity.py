"""Logit parity with Hugging Face transformers (a test-only reference) on tiny random checkpoints.

Each architecture is written to disk in the Hugging Face layout (config.json + model.safetensors +
tokenizer.json) and loaded through ``keepkv.models.load``. Claim: float32 max |logit difference| <= 1e-4 for the
whole prompt (teacher forcing) and for 16 decode steps, batch 1 and batch 2 with left or right padding.
"""

from __future__ import annotations

import pytest
import torch

from keepkv.models import load
from tests.conftest import TINY_VOCAB, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
DECODE_STEPS = 16
COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=512, eos_token_id=2, pad_token_id=0)
ARCHITECTURES = {
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(
        num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """``(folder, hf_model)``: a random tiny model saved as safetensors in the Hugging Face layout."""
    config_name, model_name, extra = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_name)(**COMMON, **extra)
    hf_model = getattr(transformers, model_name)(hf_config).eval()
    with torch.no_grad():  # make the small random weights large enough that errors would show
        for name, parameter in hf_model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder, safe_serialization=True)
    write_tiny_tokenizer(folder)
    return folder, hf_model


def make_batch(lengths, padding_side, total, seed=0):
    """Random ids ``[B, total]`` and a mask with each row's ``length`` real tokens on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if padding_side == "left":
            mask[row, total - length:] = 1
        else:
            mask[row, :length] = 1
    return ids, mask


def hf_logits(hf_model, ids, mask):
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()


@pytest.mark.parametrize("lengths,padding_side", [((23,), "left"), ((23, 14), "left"), ((23, 14), "right")])
def test_prefill_logits_match(checkpoint, lengths, padding_side):
    folder, hf_model = checkpoint
    model = load(folder, compile=False, device="cpu")
    ids, mask = make_batch(lengths, padding_side, max(lengths))
    ours = model.logits(ids, mask)
    reference = hf_logits(hf_model, ids, mask)
    real = mask.bool()
    assert (ours[real] - reference[real]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("lengths", [(23,), (23, 14)])
def test_decode_steps_match(checkpoint, lengths):
    """Prefill a left-padded prompt, then feed 16 fixed tokens one decode step at a time; each step's logits
    equal the reference's teacher-forced logits at that position."""
    folder, hf_model = checkpoint
    model = load(folder, compile=False, device="cpu")
    prompt_len = max(lengths)
    ids, mask = make_batch(lengths, "left", prompt_len + DECODE_STEPS, seed=1)
    mask[:, prompt_len:] = 1
    prompt_mask = mask[:, :prompt_len]
    for row, length in enumerate(lengths):  # left padding: real prompt tokens end at prompt_len
        prompt_mask[row] = 0
        prompt_mask[row, prompt_len - length:] = 1
    reference = hf_logits(hf_model, ids, mask)

    engine = model.engine
    engine.prepare_caches(len(lengths), prompt_len, DECODE_STEPS)
    with torch.inference_mode():
        last_logits, positions = engine.prefill(ids[:, :prompt_len], prompt_mask.bool())
        assert (last_logits - reference[:, prompt_len - 1]).abs().max() <= TOLERANCE
        for step in range(DECODE_STEPS - 1):
            token = ids[:, prompt_len + step]
            logits = engine.decode_step(token, positions)
            positions = positions + 1
            assert (logits - reference[:, prompt_len + step]).abs().max() <= TOLERANCE, f"decode step {step}"


def test_sliding_window_is_shorter_than_the_sequence(checkpoint):
    folder, hf_model = checkpoint
    model = load(folder, compile=False, device="cpu")
    if model.config.arch == "mistral":
        assert model.config.sliding_window == 8 < 23 + DECODE_STEPS
    else:
        assert model.config.sliding_window is None
