"""Automatic prefill chunks (``prefill_chunk_size=None``, issue 15): long chunks where the chunk cannot change the
results (the full cache, ``prefill_compression="once"``) and the split kernel runs them, the remainder first, the
same logits as ordinary chunks up to float rounding; long chunks and a ``budget + long chunk`` prefill buffer on
every kernel for caches compressed during prefill (compiled and eager engines compress at the same points and keep
the same entries); ordinary chunks for explicit sizes; no recompile across prompt lengths (at most two chunk shapes)."""

from __future__ import annotations

import pytest
import torch

from keepkv.cache.manager import CacheManager
from keepkv.errors import KeepKVError
from keepkv.generate import (
    DEFAULT_PREFILL_CHUNK,
    GenerationEngine,
    activation_bytes_per_token,
    automatic_long_chunk,
    chunk_widths,
    remainder_first_widths,
    uncompressed_long_chunk,
)
from keepkv.models.loading import resolve_method
from keepkv.runtime import RuntimeOptions
from keepkv.sampling import SamplingConfig
from tests.conftest import tiny_config, tiny_network

SMALL_CHUNK, LONG_CHUNK = 16, 64  # a short prompt then takes long chunks (the defaults: 512, 2048 and 4096)
RUNTIME = RuntimeOptions(prefill_long_chunk=LONG_CHUNK, prefill_uncompressed_long_chunk=LONG_CHUNK)


def automatic_engine(network, *, compile=True, manager=None) -> GenerationEngine:
    engine = GenerationEngine(network, compile=compile, prefill_chunk_size=None, cache_manager=manager,
                              runtime=RUNTIME)
    assert engine.automatic_chunks and engine.prefill_chunk_size == DEFAULT_PREFILL_CHUNK
    engine.prefill_chunk_size = SMALL_CHUNK  # the ordinary chunk, scaled down with the long one
    return engine


@pytest.fixture(scope="module")
def network():
    return tiny_network()


@pytest.mark.parametrize("chunk,long_chunk", [(16, 16), (16, 64), (512, 2048)])
def test_chunk_widths_cover_the_prompt_long_pieces_first(chunk, long_chunk):
    for tokens in (1, 15, 16, 17, 63, 64, 65, 200, 2047, 2048, 4097):
        widths = chunk_widths(tokens, chunk, long_chunk)
        assert set(widths) <= {chunk, long_chunk}
        assert sum(widths) == -(-tokens // chunk) * chunk  # the padded prompt of ordinary chunks
        assert widths == sorted(widths, reverse=True)
        assert widths.count(long_chunk if long_chunk > chunk else -1) == (tokens // long_chunk
                                                                           if long_chunk > chunk else 0)


def test_remainder_first_widths_cover_the_prompt_with_one_short_forward_first():
    for long_chunk in (64, 2048):
        for tokens in (long_chunk, long_chunk + 2, 2 * long_chunk, 3 * long_chunk - 5, 7936):
            if tokens % long_chunk == 1:
                continue
            rest = tokens % long_chunk
            assert remainder_first_widths(tokens, long_chunk) == [rest] * (rest > 0) + [long_chunk] * (
                tokens // long_chunk)
    assert remainder_first_widths(7936, 2048) == [1792, 2048, 2048, 2048]
    for tokens in (63, 65, 129):  # shorter than one long chunk; a one-token remainder
        with pytest.raises(ValueError, match="remainder"):
            remainder_first_widths(tokens, 64)


def test_prefill_widths_put_the_remainder_first_only_where_the_chunks_cannot_change_the_results(network):
    """The full cache and ``prefill_compression="once"`` on long chunks: remainder first, unpadded; a one-token
    remainder, a prompt shorter than a long chunk, an eager engine and a cache compressed during prefill keep
    :func:`chunk_widths` (the latter's chunks decide where it compresses)."""
    _, keepkv = resolve_method("keepkv", 0.25, {})
    once = CacheManager(network.config, torch.float32, torch.device("cpu"), keepkv, 0.25,
                        prefill_compression="once", runtime=RUNTIME)
    for manager in (None, once):
        engine = automatic_engine(network, manager=manager)
        engine.prepare_caches(1, 150, 4)
        for tokens, widths in ((150, [22, 64, 64]), (128, [64, 64]), (129, [64, 64, 16]), (60, [16] * 4)):
            assert engine.prefill_widths(torch.ones(1, tokens, dtype=torch.bool)) == widths
        eager = automatic_engine(network, compile=False, manager=manager)
        assert eager.prefill_widths(torch.ones(1, 150, dtype=torch.bool)) == [16] * 10
    chunked = automatic_engine(network, manager=chunked_manager(network))
    chunked.prepare_caches(1, 150, 4)
    assert chunked.prefill_widths(torch.ones(1, 150, dtype=torch.bool)) == [64, 64, 16, 16]


def test_automatic_long_chunk_respects_the_activation_bound():
    config = tiny_config(hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=2)
    per_token = activation_bytes_per_token(config, torch.float32)
    assert per_token == 4 * (4 * 1024 + (2 * 8 + 2 * 2) * 32 + 4 * 256)
    runtime = RuntimeOptions(prefill_long_chunk=2048, prefill_activation_bytes=per_token * 1000)
    previous = None
    for batch in (1, 2, 3, 8):
        long_chunk = automatic_long_chunk(config, torch.float32, batch, 128, runtime)
        assert long_chunk % 128 == 0 and 128 <= long_chunk <= 2048
        assert long_chunk == 128 or batch * long_chunk * per_token <= runtime.prefill_activation_bytes
        assert previous is None or long_chunk <= previous
        previous = long_chunk
    assert automatic_long_chunk(config, torch.float32, 1, 128, runtime) == 896  # 1000 rows -> 7 chunks
    assert automatic_long_chunk(config, torch.bfloat16, 1, 128, runtime) == 1920  # half the bytes per row


def test_a_prefill_compressing_nothing_before_its_end_takes_the_wider_uncompressed_chunk(network):
    """``prefill_uncompressed_long_chunk`` bounds the long chunk of the full cache and of
    ``prefill_compression="once"`` (their results do not depend on it), ``prefill_long_chunk`` that of a cache
    compressed during prefill (its chunks decide what it keeps); both within the activation bound."""
    runtime = RuntimeOptions(prefill_long_chunk=LONG_CHUNK, prefill_uncompressed_long_chunk=2 * LONG_CHUNK)
    valid = torch.ones(1, 300, dtype=torch.bool)
    _, keepkv = resolve_method("keepkv", 0.25, {})
    managers = {kind: CacheManager(network.config, torch.float32, torch.device("cpu"), keepkv, 0.25,
                                   prefill_compression=kind, runtime=runtime) for kind in ("once", "chunked")}
    for kind, manager in (("full", None), *managers.items()):
        engine = GenerationEngine(network, compile=True, prefill_chunk_size=None, cache_manager=manager,
                                  runtime=runtime)
        engine.prefill_chunk_size = SMALL_CHUNK
        engine.prepare_caches(1, valid.shape[1], 4)
        expected = LONG_CHUNK if kind == "chunked" else 2 * LONG_CHUNK
        assert engine.long_chunk(valid) == expected, kind
        assert max(engine.prefill_widths(valid)) == expected, kind
        if kind != "chunked":  # a prompt shorter than the wide chunk keeps the ordinary long chunk, not 16s
            assert engine.prefill_widths(valid[:, :100]) == [36, 64], kind
            assert engine.prefill_widths(valid[:, :128]) == [128], kind
    config = tiny_config(hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=2)
    per_token = activation_bytes_per_token(config, torch.float32)
    bounded = RuntimeOptions(prefill_long_chunk=512, prefill_uncompressed_long_chunk=4096,
                             prefill_activation_bytes=per_token * 1000)
    assert automatic_long_chunk(config, torch.float32, 1, 128, bounded) == 512
    # the wide chunk does not fit the activation bound: the ordinary long chunk, never a width in between
    assert uncompressed_long_chunk(config, torch.float32, 1, 128, bounded, 10_000) == 512
    roomy = RuntimeOptions(prefill_long_chunk=512, prefill_uncompressed_long_chunk=1024,
                           prefill_activation_bytes=per_token * 1000)
    assert uncompressed_long_chunk(config, torch.bfloat16, 1, 128, roomy, 10_000) == 1024
    assert uncompressed_long_chunk(config, torch.bfloat16, 1, 128, roomy, 1000) == 512  # the prompt is shorter
    assert uncompressed_long_chunk(config, torch.float32, 1, 128, roomy, 10_000) == 512  # 1024 rows do not fit
    # a long chunk set above the uncompressed one applies to the full cache too
    narrower = RuntimeOptions(prefill_long_chunk=1024, prefill_uncompressed_long_chunk=256,
                              prefill_activation_bytes=per_token * 1000)
    assert uncompressed_long_chunk(config, torch.bfloat16, 1, 128, narrower, 10_000) == 1024
    assert RuntimeOptions().prefill_uncompressed_long_chunk == 4096
    with pytest.raises(KeepKVError, match="prefill_uncompressed_long_chunk"):
        RuntimeOptions(prefill_uncompressed_long_chunk=0)


def chunked_manager(network, method="keepkv", budget=0.25) -> CacheManager:
    _, resolved = resolve_method(method, budget, {})
    return CacheManager(network.config, torch.float32, torch.device("cpu"), resolved, budget,
                        prefill_compression="chunked", runtime=RUNTIME)


def test_which_caches_take_long_chunks(network):
    """The full cache and ``prefill_compression="once"``: long chunks where the split kernel runs them (not for a
    left-padded prompt, not eagerly). A cache compressed during prefill: long chunks on every kernel and a prefill
    buffer with room for one (its chunks decide what it keeps), except for a method accumulating attention over
    every query (H2O) and for an explicit chunk size."""
    config, dtype, device = network.config, torch.float32, torch.device("cpu")
    valid = torch.ones(1, 150, dtype=torch.bool)
    left_padded = torch.cat((torch.zeros(1, 5, dtype=torch.bool), valid[:, 5:]), dim=1)
    _, keepkv = resolve_method("keepkv", 0.25, {})
    once = CacheManager(config, dtype, device, keepkv, 0.25, prefill_compression="once", runtime=RUNTIME)
    for manager in (None, once):
        engine = automatic_engine(network, manager=manager)
        engine.prepare_caches(1, valid.shape[1], 4)
        assert engine.long_chunk(valid) == LONG_CHUNK
        assert engine.long_chunk(valid[:, :LONG_CHUNK - 1]) == SMALL_CHUNK  # shorter than one long chunk
        assert engine.long_chunk(left_padded) == SMALL_CHUNK  # FlexAttention's chunks keep their size
        eager = automatic_engine(network, compile=False, manager=manager)
        eager.prepare_caches(1, valid.shape[1], 4)
        assert eager.long_chunk(valid) == SMALL_CHUNK  # results do not depend on it: the fused kernel only
    for compile in (True, False):
        engine = automatic_engine(network, compile=compile, manager=chunked_manager(network))
        engine.prepare_caches(1, valid.shape[1], 4)
        assert engine.long_chunk(valid) == engine.long_chunk(left_padded) == LONG_CHUNK
        assert engine.cache_manager.room == LONG_CHUNK  # the prefill buffer: budget + one long chunk
        assert chunk_widths(valid.shape[1], SMALL_CHUNK, engine.long_chunk(valid)) == [64, 64, 16, 16]
        h2o = automatic_engine(network, compile=compile, manager=chunked_manager(network, "h2o"))
        h2o.prepare_caches(1, valid.shape[1], 4)
        assert h2o.long_chunk(valid) == h2o.cache_manager.room == SMALL_CHUNK
    explicit = GenerationEngine(network, compile=True, prefill_chunk_size=SMALL_CHUNK, runtime=RUNTIME,
                                cache_manager=chunked_manager(network))
    explicit.prepare_caches(1, valid.shape[1], 4)
    assert not explicit.automatic_chunks and explicit.long_chunk(valid) == explicit.cache_manager.room == SMALL_CHUNK


@pytest.mark.compile
def test_compressed_prefill_takes_long_chunks_alike_compiled_and_eager(network):
    """A cache compressed during prefill with automatic chunks: compiled and eager engines feed the same widths,
    compress at the same points (a prompt of at most ``budget + long chunk`` tokens only at its end) and keep the
    same entries, and prompts of other lengths run with recompilation forbidden."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (1, 150), generator=g)

    def run(compile, prompt, budget=0.25):
        engine = automatic_engine(network, compile=compile, manager=chunked_manager(network, "keepkv", budget))
        widths, points = [], []
        forward, make_room = engine._forward_chunk, engine.cache_manager.make_room

        def counted(new_tokens):
            before = engine.cache_manager.compressions
            caches = make_room(new_tokens)
            points.extend([sum(widths) - new_tokens] if engine.cache_manager.compressions > before else [])
            return caches

        engine.cache_manager.make_room = counted
        engine._forward_chunk = lambda i, p, v: widths.append(i.shape[1]) or forward(i, p, v)
        ok = torch.ones_like(prompt, dtype=torch.bool)
        tokens = torch.stack(list(engine.generate_tokens(prompt, ok, 4, SamplingConfig())), dim=1)
        prefill_widths = widths[: len(chunk_widths(prompt.shape[1], SMALL_CHUNK, LONG_CHUNK))]
        kept = [sorted(cache.positions[0, 0][cache.positions[0, 0] >= 0].tolist()) for cache in engine.caches]
        return prefill_widths, points, tokens, kept

    compiled, eager = run(True, ids), run(False, ids)
    assert compiled[0] == [LONG_CHUNK, LONG_CHUNK, SMALL_CHUNK, SMALL_CHUNK]
    assert eager[0] == [LONG_CHUNK, LONG_CHUNK, SMALL_CHUNK, 6]  # a compiled engine pads its last chunk
    assert compiled[1] == eager[1] and compiled[1][:1] == [LONG_CHUNK]  # the buffer filled after one long chunk
    assert torch.equal(compiled[2], eager[2]) and compiled[3] == eager[3]
    short = ids[:, :120]  # 120 <= ceil(0.5 * 120) + 64 fits the prefill buffer: compressed once, at the end
    assert run(False, short, 0.5)[1] == [] and run(True, short, 0.5)[1] == []
    engine = automatic_engine(network, manager=chunked_manager(network, "keepkv", 0.5))
    for length in (150, 146, 120):  # other mixes of long and ordinary chunks and other budgets: the same two
        prompt = ids[:, :length]    # chunk shapes, so the prefill compiles nothing new (the decode step's graph
        ok = torch.ones_like(prompt, dtype=torch.bool)  # follows the decode buffer's capacity, as before)
        with torch._dynamo.config.patch(error_on_recompile=length != 150), torch.inference_mode():
            engine.prepare_caches(1, length, 4)
            engine.prefill(prompt, ok)
            engine.end_prefill()


@pytest.mark.compile
def test_long_chunks_give_the_same_logits_and_tokens_without_recompiling(network):
    """Teacher-forced logits and greedy tokens of the full cache with long chunks equal those of ordinary chunks
    (float rounding); prompts of other lengths (other numbers of long and ordinary chunks) then run with
    recompilation forbidden."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (1, 150), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    plain = GenerationEngine(network, compile=True, prefill_chunk_size=SMALL_CHUNK, runtime=RUNTIME)
    auto = automatic_engine(network)
    widths = []
    forward = auto._forward_chunk
    auto._forward_chunk = lambda i, p, v: widths.append(i.shape[1]) or forward(i, p, v)
    expected = plain.teacher_forced_logits(ids, valid)
    got = auto.teacher_forced_logits(ids, valid)
    assert widths == [150 - 2 * LONG_CHUNK, LONG_CHUNK, LONG_CHUNK]  # the remainder first, unpadded
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)

    def greedy(engine, prompt):
        ok = torch.ones_like(prompt, dtype=torch.bool)
        return torch.stack(list(engine.generate_tokens(prompt, ok, 6, SamplingConfig())), dim=1)

    assert torch.equal(greedy(auto, ids), greedy(plain, ids))
    widths.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (140, 100, 70):  # same capacity bucket: the decode graph is shared too
            greedy(auto, ids[:, :length])
    assert widths == [140 - 2 * LONG_CHUNK, LONG_CHUNK, LONG_CHUNK] + [100 - LONG_CHUNK, LONG_CHUNK] + [
        70 - LONG_CHUNK, LONG_CHUNK]


@pytest.mark.compile
def test_a_right_padded_batch_fed_remainder_first_gives_each_rows_own_last_logits(network):
    """Rows ending in the first (remainder) forward, in a later one and at the prompt's end: each row's logits
    equal those of the row alone on an eager engine (float rounding)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (3, 150), generator=g)
    lengths = (150, 100, 20)
    valid = torch.arange(150)[None, :] < torch.tensor(lengths)[:, None]
    auto = automatic_engine(network)
    auto.prepare_caches(3, 150, 1)
    assert auto.prefill_widths(valid) == [22, 64, 64]
    with torch.inference_mode():
        logits, next_positions = auto.prefill(ids, valid)
    assert next_positions.tolist() == list(lengths)
    for row, length in enumerate(lengths):
        alone = GenerationEngine(network, compile=False, prefill_chunk_size=SMALL_CHUNK, runtime=RUNTIME)
        alone.prepare_caches(1, length, 1)
        with torch.inference_mode():
            expected, _ = alone.prefill(ids[row:row + 1, :length], valid[row:row + 1, :length])
        torch.testing.assert_close(logits[row], expected[0], atol=2e-4, rtol=1e-4)


def test_automatic_chunks_are_the_default_and_an_explicit_size_passes_through(network):
    """``load()``, the CLI and a bare engine default to automatic chunks; an explicit integer is used as given, and
    ``prefill_chunk_setting`` (what serve's variants, chat and the lm-eval integration hand to the engines they
    build on the same network) reproduces either choice."""
    import argparse
    import inspect

    from keepkv.cli.common import add_model_arguments
    from keepkv.models import load

    assert inspect.signature(load).parameters["prefill_chunk_size"].default is None
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert parser.parse_args(["SmolLM2-135M-Instruct"]).prefill_chunk_size is None
    assert parser.parse_args(["SmolLM2-135M-Instruct", "--prefill-chunk-size", "256"]).prefill_chunk_size == 256
    auto = GenerationEngine(network, compile=False)
    assert auto.automatic_chunks and auto.prefill_chunk_setting is None
    assert auto.prefill_chunk_size == DEFAULT_PREFILL_CHUNK
    explicit = GenerationEngine(network, compile=False, prefill_chunk_size=256)
    assert not explicit.automatic_chunks and explicit.prefill_chunk_setting == 256
    for base in (auto, explicit):
        again = GenerationEngine(network, compile=False, prefill_chunk_size=base.prefill_chunk_setting)
        assert (again.automatic_chunks, again.prefill_chunk_size) == (base.automatic_chunks, base.prefill_chunk_size)


@pytest.mark.parametrize("budgets", [1, 3])
def test_a_larger_prefill_buffer_compresses_less_often_at_the_same_points_compiled_or_eager(budgets):
    """``prefill_buffer_budgets = k`` (the cadence option measured in ``docs/profile.md``): the chunked prefill buffer
    holds ``k`` budgets plus a chunk, never more, and a compiled engine (last chunk padded) compresses at the same
    prompt offsets as an eager one; ``k = 3`` compresses less often than ``k = 1``."""
    from keepkv.cache.manager import CacheManager, round_up
    from keepkv.cache.methods import make_method
    from keepkv.errors import KeepKVError

    config = tiny_config(num_layers=2)

    def points(prompt, budget, chunk, k, compiled):
        manager = CacheManager(config, torch.float32, torch.device("cpu"),
                               make_method("streamingllm", sinks=1, window=2), budget,
                               prefill_buffer_budgets=k)
        manager.allocate(1, round_up(prompt, chunk) if compiled else prompt, 1, chunk, prompt)
        assert manager.caches[0].capacity <= max(k * manager.budget + chunk, round_up(prompt, chunk))
        found = []
        for start in range(0, prompt, chunk):
            width = chunk if compiled else min(chunk, prompt - start)
            before = manager.compressions
            manager.make_room(width)
            assert manager.caches[0].capacity <= max(k * manager.budget + chunk, round_up(prompt, chunk))
            found += [start] if manager.compressions > before else []
            manager.wrote(width)
        return found

    for prompt, budget, chunk in ((4096, 410, 512), (1000, 37, 64), (333, 20, 16), (90, 50, 32)):
        eager = points(prompt, budget, chunk, budgets, compiled=False)
        assert points(prompt, budget, chunk, budgets, compiled=True) == eager
        if budgets > 1:
            assert len(eager) < len(points(prompt, budget, chunk, 1, compiled=False)) or prompt <= budget + chunk
    assert len(points(4096, 410, 512, budgets, compiled=False)) == (7 if budgets == 1 else 3)
    with pytest.raises(KeepKVError, match="prefill_buffer_budgets"):
        CacheManager(config, torch.float32, torch.device("cpu"), make_method("snapkv"), 10,
                     prefill_buffer_budgets=0)
