"""keepkv's methods inside a stock transformers model (:mod:`keepkv.integrations.transformers`).

SmolLM2-135M-Instruct is loaded by transformers from the offline GGUF (float32) and by keepkv's native engine
(eager, dense reference attention). Claims, greedy, 32 new tokens after a prompt of 240 tokens:

- ``kv_budget=1.0`` inside ``KVCompression`` gives exactly plain ``model.generate()``;
- at 20% keepkv, snapkv, tova and streamingllm give exactly the native engine's tokens, with the same schedule
  on both sides: prefill in chunks of 96 (so the cache is compressed twice during prefill and once at its end)
  and ``decode_slack=8`` (compressed every 8 decode steps);
- a left-padded batch of two prompts gives each row's single-prompt tokens (an integer budget, so both rows have
  the same budget alone and together), and the native engine's batch tokens;
- unsupported models and kernels are refused with an error naming what is supported; the model's attention
  implementation and ``generate`` are restored on exit, also after an exception.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from keepkv.cache.methods import make_method  # noqa: E402
from keepkv.errors import KeepKVError  # noqa: E402
from keepkv.integrations.transformers import KVCompression  # noqa: E402
from keepkv.models.language_model import LanguageModel  # noqa: E402
from keepkv.sampling import SamplingConfig  # noqa: E402

NEW_TOKENS = 32
PROMPT_TOKENS = 240
CHUNK = 96
SLACK = 8
BATCH_NEW_TOKENS = 20  # two decode-time compressions at SLACK = 8
TEXT = Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt"


@pytest.fixture(scope="module")
def hf_model(hf_smollm2):
    """The session's transformers SmolLM2 (conftest); ``KVCompression`` restores it on exit."""
    return hf_smollm2


@pytest.fixture(scope="module")
def prompt_ids(smollm2_eager):
    return torch.tensor([smollm2_eager.tokenizer.encode(TEXT.read_text())[:PROMPT_TOKENS]])


def hf_generate(model, ids, mask=None, new_tokens=NEW_TOKENS):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


def native_tokens(smollm2_eager, method, kv_budget, ids, valid, *, prefill_chunk_size=CHUNK, new_tokens=NEW_TOKENS):
    """The native engine's greedy tokens ``[B, NEW_TOKENS]`` (eager, the loaded SmolLM2's weights)."""
    native = LanguageModel(
        smollm2_eager.network, smollm2_eager.tokenizer, name="SmolLM2", source="", method=method,
        kv_budget=kv_budget, compile=False, prefill_chunk_size=prefill_chunk_size,
        method_object=make_method(method), decode_slack=SLACK,
    )
    tokens = native.engine.generate_tokens(ids, valid, new_tokens, SamplingConfig(0.0))
    return torch.stack(list(tokens), dim=1), native.engine.cache_manager


def test_full_budget_equals_plain_generate(hf_model, prompt_ids):
    plain = hf_generate(hf_model, prompt_ids)
    with KVCompression(hf_model, kv_budget=1.0):
        inside = hf_generate(hf_model, prompt_ids)
    assert torch.equal(inside, plain)


@pytest.mark.parametrize("method", ["keepkv", "snapkv", "tova", "streamingllm"])
def test_compressed_equals_native_engine(hf_model, smollm2_eager, prompt_ids, method):
    expected, native_manager = native_tokens(smollm2_eager, method, 0.2, prompt_ids,
                                             torch.ones_like(prompt_ids, dtype=torch.bool))
    with KVCompression(hf_model, method=method, kv_budget=0.2, prefill_chunk_size=CHUNK,
                       decode_slack=SLACK) as compression:
        got = hf_generate(hf_model, prompt_ids)
    cache = compression.last_cache
    assert cache.compressions == native_manager.compressions >= 3  # twice in prefill, at its end, in decode
    assert cache.manager.budget == native_manager.budget == math.ceil(0.2 * PROMPT_TOKENS)
    live = cache.entries_per_head()
    # decode room: W, or max_new_tokens for methods that compress once (SnapKV)
    assert int(live.max()) <= cache.manager.budget + NEW_TOKENS
    assert torch.equal(got, expected), f"{method}: {got.tolist()} != {expected.tolist()}"


def test_left_padded_batch_equals_single_rows(hf_model, smollm2_eager, prompt_ids):
    long = prompt_ids[:, :160]
    short = long[:, 60:]
    ids = torch.cat((long, torch.cat((torch.zeros_like(long[:, :60]), short), dim=1)))
    mask = torch.ones_like(ids)
    mask[1, :60] = 0
    budget = 48
    with KVCompression(hf_model, method="keepkv", kv_budget=budget, decode_slack=SLACK):
        batch = hf_generate(hf_model, ids, mask, new_tokens=BATCH_NEW_TOKENS)
        singles = torch.cat((hf_generate(hf_model, long, new_tokens=BATCH_NEW_TOKENS),
                             hf_generate(hf_model, short, new_tokens=BATCH_NEW_TOKENS)))
    assert torch.equal(batch, singles)
    native, _ = native_tokens(smollm2_eager, "keepkv", budget, ids, mask.bool(), prefill_chunk_size=512,
                              new_tokens=BATCH_NEW_TOKENS)
    assert torch.equal(batch, native)


def test_restores_attention_implementation_also_after_an_exception(hf_model):
    before = hf_model.config._attn_implementation
    with pytest.raises(RuntimeError, match="inside"):
        with KVCompression(hf_model, method="tova", kv_budget=0.5):
            assert hf_model.config._attn_implementation == "keepkv"
            raise RuntimeError("inside")
    assert hf_model.config._attn_implementation == before
    assert "generate" not in hf_model.__dict__


def test_refuses_unsupported_models_kernels_and_options(hf_model):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(KeepKVError, match="llama, mistral, qwen2, qwen3"):
        KVCompression(gpt2, kv_budget=0.2)
    mixed = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    with pytest.raises(KeepKVError, match="sliding-window"):
        KVCompression(mixed, kv_budget=0.2)
    with pytest.raises(KeepKVError, match="reference, flex"):
        KVCompression(hf_model, kv_budget=0.2, kernel="flash")
    with pytest.raises(KeepKVError, match="does not take option"):
        KVCompression(hf_model, method="tova", kv_budget=0.2, variant="zip")
    ids = torch.tensor([[1, 2, 3]])
    with KVCompression(hf_model, kv_budget=0.5):
        with pytest.raises(KeepKVError, match="KeepKVCache"):  # a forward with transformers' own cache
            hf_model(input_ids=ids, use_cache=True)
        with pytest.raises(KeepKVError, match="beam"):
            hf_model.generate(input_ids=ids, num_beams=2, max_new_tokens=2)


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_full_budget_equals_plain_generate(family):
    """Tiny random models of each family, a left-padded batch of two: keepkv's buffers and attention at
    ``kv_budget=1.0`` give transformers' own greedy tokens (Mistral: through a sliding window shorter than the
    sequence), and a compressed run keeps at most its budget."""
    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**TINY, **extra)).eval()
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        with KVCompression(model, kv_budget=1.0):
            inside = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        with KVCompression(model, method="tova", kv_budget=12, window=4, decode_slack=2) as compression:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(inside, plain)
    assert int(compression.last_cache.entries_per_head().max()) <= 12 + 2


def test_keepkv_core_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, keepkv, keepkv.models, keepkv.context, keepkv.integrations, keepkv.cli; "
            "assert 'transformers' not in sys.modules, 'keepkv core imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)
