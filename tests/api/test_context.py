"""Prefill once, ask many (:mod:`keepkv.context`) on the real SmolLM2 (eager, float32).

Claims: a query-aware context answers its question exactly as one native generation over context + question
(SnapKV compresses once, so the native run compresses at the same point); the query-agnostic and query-aware
compressions keep different entries; answers are repeatable and independent of the questions asked before;
a saved context loads back and answers identically; a context from another model (name, shapes, weights), a file
that is not a context, and bad arguments are each a KeepKVError.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from keepkv.cache.methods import make_method
from keepkv.context import load_context, model_identity
from keepkv.errors import KeepKVError
from keepkv.generate import DEFAULT_PREFILL_CHUNK
from keepkv.models.language_model import LanguageModel
from keepkv.sampling import SamplingConfig
from tests.conftest import tiny_config, tiny_network

TEXT = (Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt").read_text()
NEW = 12


@pytest.fixture(scope="module")
def context_text(smollm2_eager):
    return smollm2_eager.tokenizer.decode(smollm2_eager.tokenizer.encode(TEXT)[:200])


QUESTION = "\n\nQuestion: what is this text about?\nAnswer:"
OTHER = "\n\nQuestion: name one word from the text.\nAnswer:"


def test_query_aware_context_equals_one_native_generation(smollm2_eager, context_text):
    model = smollm2_eager
    ctx = model.prefill(context_text, kv_budget=0.2, method="snapkv", question=QUESTION)
    answer = ctx.generate(max_new_tokens=NEW)
    ids = model.tokenizer.encode(context_text) + model.tokenizer.encode(QUESTION, add_bos=False)
    native = LanguageModel(model.network, model.tokenizer, name=model.name, source="", method="snapkv",
                           kv_budget=0.2, compile=False, prefill_chunk_size=model.engine.prefill_chunk_setting,
                           method_object=make_method("snapkv"))
    input_ids = torch.tensor([ids])
    tokens = [int(t[0]) for t in native.engine.generate_tokens(input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                                                                NEW, SamplingConfig(0.0),
                                                                tuple(model.tokenizer.eos_token_ids))]
    eos = set(model.tokenizer.eos_token_ids)
    expected = model.tokenizer.decode(tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))])
    assert answer == expected
    assert ctx.budget == native.engine.cache_manager.budget == math.ceil(0.2 * len(ids))
    assert int(ctx.entries_per_head().max()) == ctx.budget
    # the context's engine chunks as the model's does (automatic: the same prefill room as generate())
    assert ctx.engine.prefill_chunk_setting is model.engine.prefill_chunk_setting is None
    assert ctx.engine.prefill_room(1) == native.engine.prefill_room(1) > DEFAULT_PREFILL_CHUNK


def test_repeatable_independent_and_saved(smollm2_eager, context_text, tmp_path):
    model = smollm2_eager
    ctx = model.prefill(context_text, kv_budget=0.2, method="keepkv")
    aware = model.prefill(context_text, kv_budget=0.2, method="keepkv", question=QUESTION)
    def kept(c):  # context positions each KV head of layer 10 kept (the question's own entries left out)
        return [sorted(p for p in head if 0 <= p < ctx.prompt_tokens) for head in c.caches[10].positions[0].tolist()]
    assert kept(ctx) != kept(aware)  # the question steers what is kept of the context
    first = ctx.generate(QUESTION, max_new_tokens=NEW)
    other = ctx.generate(OTHER, max_new_tokens=NEW)
    assert ctx.generate(QUESTION, max_new_tokens=NEW) == first  # after another question: same answer
    assert first and other and first != other
    path = ctx.save(tmp_path / "ctx.safetensors")
    loaded = load_context(path, model)
    assert loaded.method == "keepkv" and loaded.prompt_tokens == ctx.prompt_tokens and loaded.budget == ctx.budget
    assert loaded.generate(QUESTION, max_new_tokens=NEW) == first
    assert loaded.generate(max_new_tokens=NEW) == ctx.generate(max_new_tokens=NEW)
    assert not list(tmp_path.glob("*.partial"))


def test_query_agnostic_context_ranks_with_the_agnostic_weight(smollm2_eager, context_text):
    """Without a question, KeepKV compresses as ``for_query_agnostic()``: the entries kept are those of
    ``last_query_weight = agnostic_last_query_weight`` (default 1, the newest query), not the window mean's."""
    model = smollm2_eager
    def kept(ctx):
        return [cache.positions.sort(dim=-1).values for cache in ctx.caches]
    default = kept(model.prefill(context_text, kv_budget=0.2, method="keepkv"))
    newest = kept(model.prefill(context_text, kv_budget=0.2, method="keepkv", last_query_weight=1.0))
    window_mean = kept(model.prefill(context_text, kv_budget=0.2, method="keepkv", agnostic_last_query_weight=0.0))
    assert all(torch.equal(a, b) for a, b in zip(default, newest))
    assert not all(torch.equal(a, b) for a, b in zip(default, window_mean))


def test_mismatches_are_errors(smollm2_eager, context_text, tmp_path):
    model = smollm2_eager
    path = model.prefill(context_text[:400], kv_budget=64, method="tova").save(tmp_path / "c.safetensors")
    renamed = LanguageModel(model.network, model.tokenizer, name="another-model", source="", method="full",
                            kv_budget=None, compile=False, prefill_chunk_size=512)
    with pytest.raises(KeepKVError, match="another model: its name"):
        load_context(path, renamed)
    tiny = LanguageModel(tiny_network(), model.tokenizer, name=model.name, source="", method="full",
                         kv_budget=None, compile=False, prefill_chunk_size=512)
    with pytest.raises(KeepKVError, match="another model: its arch|another model: its layers"):
        load_context(path, tiny)
    other_weights = LanguageModel(tiny_network(seed=1), model.tokenizer, name=model.name, source="", method="full",
                                  kv_budget=None, compile=False, prefill_chunk_size=512)
    assert model_identity(tiny)["fingerprint"] != model_identity(other_weights)["fingerprint"]
    not_context = tmp_path / "x.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(not_context))
    with pytest.raises(KeepKVError, match="not a keepkv context"):
        load_context(not_context, model)
    with pytest.raises(KeepKVError, match="no saved context"):
        load_context(tmp_path / "missing.safetensors", model)
    with pytest.raises(KeepKVError, match="empty"):
        model.prefill("   ", kv_budget=0.2)
    with pytest.raises(KeepKVError, match="does not take option"):
        model.prefill(context_text, kv_budget=0.2, method="tova", variant="zip")
    assert tiny_config().num_layers != model.config.num_layers
