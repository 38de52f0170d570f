"""Compressions during a chunked prefill: when they happen and with which form of the method.

- A compiled engine pads the prompt's last chunk to a whole chunk; its cache manager must still compress at the
  same points of the prompt as an eager engine's (else the two keep different entries for the same prompt).
- A compression made before the whole prompt is read (mid-prompt) uses the method's query-agnostic form
  (:meth:`~keepkv.cache.policy.CompressionMethod.for_query_agnostic`); the end of prefill and decoding use the
  method itself.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv.cache.manager import CacheManager, round_up
from keepkv.cache.methods import make_method
from keepkv.generate import GenerationEngine
from tests.conftest import tiny_config, tiny_network


def prefill_compression_points(prompt: int, budget: int, chunk: int, compiled: bool) -> list[int]:
    """Prompt offsets at which the manager compresses during prefill (before writing the chunk starting there),
    fed the way an eager engine (the real width of each chunk) or a compiled one (the last chunk padded to a whole
    chunk, the prompt allocated at its padded length) feeds it."""
    config = tiny_config(num_layers=1)
    method = make_method("streamingllm", sinks=1, window=2)
    manager = CacheManager(config, torch.float32, torch.device("cpu"), method, budget, decode_slack=4)
    padded = round_up(prompt, chunk) if compiled else prompt
    manager.allocate(1, padded, 1, chunk, prompt)
    points = []
    for start in range(0, prompt, chunk):
        width = chunk if compiled else min(chunk, prompt - start)
        before = manager.compressions
        manager.make_room(width)
        if manager.compressions > before:
            points.append(start)
        manager.wrote(width)
    return points


@settings(max_examples=60, deadline=None)
@given(prompt=st.integers(4, 400), budget=st.integers(3, 200), chunk=st.integers(1, 128))
def test_compiled_and_eager_engines_compress_at_the_same_prompt_offsets(prompt, budget, chunk):
    """Padding the last chunk never adds or moves a mid-prompt compression (padding slots are empty, so an extra
    compression would change which real entries are kept)."""
    eager = prefill_compression_points(prompt, budget, chunk, compiled=False)
    assert prefill_compression_points(prompt, budget, chunk, compiled=True) == eager
    # and the schedule is the documented one: a prompt of at most budget + chunk tokens is never compressed inside
    # prefill, a longer one is
    slots = min(budget, prompt + 1)  # the budget is capped at what the generation can hold
    assert (eager == []) == (prompt <= slots + chunk)


class Recorder:
    """Wraps a method's ``compress`` to record (which form, cursor of the cache) per call."""

    def __init__(self, manager: CacheManager) -> None:
        self.calls: list[tuple[str, bool]] = []
        for tag, method in (("method", manager.method), ("context", manager.context_method)):
            original = method.compress

            def compress(cache, layer, budget, compiled=False, original=original, tag=tag):
                self.calls.append((tag, manager.decoding))
                return original(cache, layer, budget, compiled=compiled)

            method.compress = compress


def test_mid_prompt_compressions_use_the_query_agnostic_form():
    network = tiny_network()
    keepkv = make_method("keepkv", window=4, sinks=1)
    manager = CacheManager(network.config, torch.float32, torch.device("cpu"), keepkv, 24, decode_slack=8)
    assert manager.context_method is not keepkv
    assert manager.context_method.last_query_weight == keepkv.agnostic_last_query_weight == 1.0
    assert keepkv.last_query_weight == 0.0
    assert manager.context_method.stats is keepkv.stats  # one record of merges
    recorder = Recorder(manager)
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=16, cache_manager=manager)
    prompt = torch.randint(3, network.config.vocab_size, (1, 80))
    valid = torch.ones_like(prompt, dtype=torch.bool)
    engine.prepare_caches(1, 80, 20)
    with torch.inference_mode():
        _, positions = engine.prefill(prompt, valid)
        layers = network.config.num_layers
        mid_prompt = list(recorder.calls)
        engine.end_prefill()
        at_end = recorder.calls[len(mid_prompt):]
        token = torch.tensor([5])
        for _ in range(20):
            engine.decode_step(token, positions)
            positions = positions + 1
        decoding = recorder.calls[len(mid_prompt) + len(at_end):]
    # 80 tokens into 24 + 16 slots: compressions before the chunks at 32, 48 and 64, one per layer each
    assert mid_prompt == [("context", False)] * (3 * layers)
    assert at_end == [("method", False)] * layers
    assert decoding and set(decoding) == {("method", True)}
    # a method with one form for both settings compresses with itself
    snapkv = make_method("snapkv", window=4, sinks=1)
    assert CacheManager(network.config, torch.float32, torch.device("cpu"), snapkv, 24).context_method \
        is snapkv
