"""Every method on the real offline models (SmolLM2-135M-Instruct: llama, GQA 9/3; Qwen2.5-Coder-0.5B-Instruct:
qwen2, GQA 14/2): from a 1k-token prompt of real text, at budgets 0.1 and 0.5, each method compresses the
prompt, keeps what its budget allows, and its next-token distribution after compression has a finite KL to the
full cache's; it then keeps generating with its decode-time compression (``decode_slack=2``: several
compressions within a few steps).

Cost: the prompt's forward pass is run once per model with a cache that keeps everything (and every score a
method may read: the 32 newest queries, accumulated attention), then handed to each method's manager with
:meth:`GenerationEngine.start_from_prefill`, which compresses a copy as ``end_prefill`` does. That is exactly what the
engine does with ``prefill_chunk_size >= prompt`` (one chunk, compression once at the end of prefill), which
``test_shared_prefill_equals_the_engine`` checks against a real generation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from keepkv.cache.manager import CacheManager
from keepkv.cache.methods import METHODS as REGISTERED, make_method
from keepkv.eval.session import shared_prefill_manager
from keepkv.generate import GenerationEngine

pytestmark = pytest.mark.real_model
TEXT = (Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt").read_text()
PROMPT_TOKENS = 1024  # long enough that 10% (102 entries) is well above every method's protected sinks + window
BUDGETS = (0.1, 0.5)
DECODE_STEPS = 4
# every registered method (keepkv.cache.methods.METHODS) and the composed forms worth checking
METHODS = (*REGISTERED, "adakv-snapkv", "snapkv+keepkv", "criticalkv+keepkv", "adakv-criticalkv+keepkv")


class SharedPrefill:
    """One forward pass over ``prompt[:-1]`` into caches that keep everything, reused by every method
    (:func:`keepkv.eval.session.shared_prefill_manager` + :meth:`GenerationEngine.start_from_prefill`)."""

    def __init__(self, model, prompt: torch.Tensor) -> None:
        self.model, self.prompt = model, prompt
        self.context = prompt.shape[1] - 1
        manager = shared_prefill_manager(model.config, torch.float32, torch.device("cpu"), window=32, accumulate=True)
        engine = GenerationEngine(model.network, compile=False, cache_manager=manager, prefill_chunk_size=512)
        engine.prepare_caches(1, self.context, 0)
        with torch.inference_mode():
            _, self.positions = engine.prefill(prompt[:, :-1], torch.ones_like(prompt[:, :-1], dtype=torch.bool))
        self.caches = manager.caches
        full, _ = self.engine_for("snapkv", 1.0)  # budget = the whole context: nothing is compressed
        with torch.inference_mode():
            self.full_logits = full.decode_step(prompt[:, -1], self.positions)

    def engine_for(self, method_name: str, kv_budget: float) -> tuple[GenerationEngine, CacheManager]:
        """An engine whose manager compressed a copy of the shared prefill to ``kv_budget``."""
        manager = CacheManager(
            self.model.config, torch.float32, torch.device("cpu"), make_method(method_name), kv_budget=kv_budget,
            decode_slack=2,
        )
        engine = GenerationEngine(self.model.network, compile=False, cache_manager=manager)
        engine.start_from_prefill(self.caches, self.context, DECODE_STEPS + 1)
        return engine, manager


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """``KL(p_ref || p) = sum p_ref (ln p_ref - ln p)`` in float64."""
    log_p_ref = torch.log_softmax(reference_logits.double(), dim=-1)
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return float((log_p_ref.exp() * (log_p_ref - log_p)).sum())


def run_method(shared: SharedPrefill, method_name: str, kv_budget: float) -> dict:
    engine, manager = shared.engine_for(method_name, kv_budget)
    prompt = shared.prompt
    with torch.inference_mode():
        entries_after_prefill = manager.entries_per_head()
        logits = engine.decode_step(prompt[:, -1], shared.positions)
        first_kl = kl_divergence(shared.full_logits, logits)
        token, positions, entries = logits.argmax(-1), shared.positions + 1, [entries_after_prefill]
        for _ in range(DECODE_STEPS):
            logits = engine.decode_step(token, positions)
            assert torch.isfinite(logits).all()
            entries.append(manager.entries_per_head())
            token, positions = logits.argmax(-1), positions + 1
    capacities = torch.tensor([cache.capacity for cache in manager.caches])
    return {
        "kl": first_kl, "entries": torch.stack(entries), "budgets": torch.tensor(manager.layer_budgets),
        "slots": torch.tensor(manager.layer_slots), "capacities": capacities, "manager": manager,
    }


def shared_prefill_of(model) -> SharedPrefill:
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) >= PROMPT_TOKENS
    return SharedPrefill(model, torch.tensor([ids[:PROMPT_TOKENS]]))


@pytest.fixture(scope="module")
def smollm2_prefill(smollm2_eager):
    return shared_prefill_of(smollm2_eager)


@pytest.fixture(scope="module")
def qwen_prefill(qwen_eager):
    return shared_prefill_of(qwen_eager)


def check_method(shared: SharedPrefill, method_name: str) -> None:
    for kv_budget in BUDGETS:
        result = run_method(shared, method_name, kv_budget)
        where = f"{method_name} at {kv_budget}"
        assert math.isfinite(result["kl"]) and result["kl"] >= -1e-9, f"{where}: KL {result['kl']}"
        entries = result["entries"]  # [steps + 1, layers, batch, kv_heads]
        # after the prompt's compression every head holds at most its layer's slots ...
        assert (entries[0] <= result["slots"][:, None, None]).all(), where
        # ... and while decoding at most slots + W (the capacity), never more
        assert (entries <= result["capacities"][None, :, None, None]).all(), where
        assert (result["capacities"] <= result["slots"].max() + DECODE_STEPS + 1).all(), where  # one capacity
        # the asked budget was honoured on average over layers (PyramidKV / D2O move budget between layers)
        manager = result["manager"]
        assert manager.budget <= max(math.ceil(kv_budget * shared.context), manager.method.protected_entries), where
        assert float(result["budgets"].float().mean()) <= manager.budget + 1, where
        assert entries[0].float().mean() < shared.context, f"{where}: nothing was compressed"
        assert manager.compressions >= 1, where
        for cache in manager.caches:
            live = torch.isfinite(cache.log_votes)
            assert not torch.isnan(cache.log_votes).any(), where
            assert torch.isfinite(cache.keys[live]).all() and torch.isfinite(cache.values[live]).all(), where


@pytest.mark.parametrize("method_name", METHODS)
def test_smollm2_every_method_compresses_a_long_prompt(smollm2_prefill, method_name):
    check_method(smollm2_prefill, method_name)


@pytest.mark.parametrize("method_name", METHODS)
def test_qwen2_every_method_compresses_a_long_prompt(qwen_prefill, method_name):
    check_method(qwen_prefill, method_name)


def test_kl_grows_as_the_budget_shrinks(smollm2_prefill):
    assert run_method(smollm2_prefill, "streamingllm", 0.1)["kl"] > run_method(smollm2_prefill, "snapkv", 0.5)["kl"]


def test_shared_prefill_equals_the_engine(smollm2_eager, smollm2_prefill):
    """The shortcut above is the engine's own path: the full cache's logits equal a plain full-cache run, and a
    method's logits after compression equal the engine prefilling the prompt in one chunk."""
    prompt = smollm2_prefill.prompt
    valid = torch.ones_like(prompt[:, :-1], dtype=torch.bool)
    plain = GenerationEngine(smollm2_eager.network, compile=False)
    plain.prepare_caches(1, prompt.shape[1] - 1, 1)
    with torch.inference_mode():
        _, positions = plain.prefill(prompt[:, :-1], valid)
        full_logits = plain.decode_step(prompt[:, -1], positions)
    torch.testing.assert_close(smollm2_prefill.full_logits, full_logits, rtol=0, atol=1e-4)

    engine, _ = smollm2_prefill.engine_for("snapkv", 0.1)
    with torch.inference_mode():
        shortcut = engine.decode_step(prompt[:, -1], smollm2_prefill.positions)
    manager = CacheManager(smollm2_eager.config, torch.float32, torch.device("cpu"), make_method("snapkv"),
                           kv_budget=0.1, decode_slack=2)
    real = GenerationEngine(smollm2_eager.network, compile=False, cache_manager=manager,
                            prefill_chunk_size=prompt.shape[1] - 1)
    real.prepare_caches(1, prompt.shape[1] - 1, DECODE_STEPS)
    with torch.inference_mode():
        _, positions = real.prefill(prompt[:, :-1], valid)
        real.end_prefill()
        logits = real.decode_step(prompt[:, -1], positions)
    torch.testing.assert_close(shortcut, logits, rtol=0, atol=1e-3)
    assert shortcut.argmax() == logits.argmax()
