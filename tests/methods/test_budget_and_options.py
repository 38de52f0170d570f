"""Budgets, method names and method options: what is allowed, and the errors for what is not."""

from __future__ import annotations

import pytest

from keepkv.cache.budgets import entries_for_budget, is_full_budget, validate_budget
from keepkv.cache.methods import FullCache, available_methods, make_method
from keepkv.errors import KeepKVError
from keepkv.models.loading import resolve_method


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, 0, -3, "0.1", True])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(KeepKVError, match="kv_budget"):
        validate_budget(budget)


@pytest.mark.parametrize("budget,prompt,expected", [(0.1, 2000, 200), (0.1, 2001, 201), (256, 2000, 256), (1.0, 50, 50)])
def test_entries_for_budget(budget, prompt, expected):
    assert entries_for_budget(budget, prompt, protected=36) == expected


def test_budget_below_protected_entries_names_the_minimum():
    with pytest.raises(KeepKVError, match="at least 36 entries"):
        entries_for_budget(0.01, 1000, protected=36)
    with pytest.raises(KeepKVError, match="at least 36 entries"):
        entries_for_budget(20, 1000, protected=36)


def test_full_budget_means_no_compression():
    assert is_full_budget(None) and is_full_budget(1.0) and not is_full_budget(0.99) and not is_full_budget(1)
    name, method = resolve_method(None, None, {})
    assert name == "full" and isinstance(method, FullCache) and method.keeps_everything
    name, method = resolve_method("keepkv", 1.0, {})
    assert name == "keepkv" and isinstance(method, FullCache)
    assert make_method("full") == FullCache() and not make_method("keepkv").keeps_everything


def test_a_budget_without_a_method_means_keepkv():
    name, method = resolve_method(None, 0.1, {})
    assert name == "keepkv" and method.name == "keepkv"


def test_unknown_method_lists_the_registry():
    with pytest.raises(KeepKVError) as error:
        make_method("keep-kv")
    message = str(error.value)
    assert all(name in message for name in available_methods())
    assert "Did you mean: keepkv" in message


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(KeepKVError, match=r"does not take option\(s\) alpha_decay.*alpha"):
        make_method("keepkv", alpha_decay=0.5)
    with pytest.raises(KeepKVError, match="takes no options"):
        make_method("full", window=3)


@pytest.mark.parametrize("options,match", [
    (dict(variant="zipp"), "allowed: zip, convex, keep-key, minnorm"),
    (dict(reference="oracle"), "allowed: ema, last"),
    (dict(similarity_threshold=1.5), r"\[-1, 1\]"),
    (dict(alpha=1.0), r"\(0, 1\)"),
    (dict(window=-1), "non-negative integer"),
    (dict(sinks=2.5), "non-negative integer"),
    (dict(agnostic_last_query_weight=1.5), r"agnostic_last_query_weight must lie in \[0, 1\]"),
])
def test_bad_keepkv_options(options, match):
    with pytest.raises(KeepKVError, match=match):
        make_method("keepkv", **options)


def test_query_agnostic_copy_of_a_method():
    """Compressing before the question is known: KeepKV ranks with ``agnostic_last_query_weight`` (a copy, the rest
    of its options and the original unchanged); a selector's ranking (``X+keepkv``) and other methods are
    unchanged."""
    keepkv = make_method("keepkv", window=8)
    agnostic = keepkv.for_query_agnostic()
    assert agnostic is not keepkv and keepkv.last_query_weight == 0.0 and agnostic.last_query_weight == 1.0
    assert {**agnostic.options(), "last_query_weight": 0.0} == keepkv.options()
    tuned = make_method("keepkv", last_query_weight=0.3, agnostic_last_query_weight=0.3)
    assert tuned.for_query_agnostic() is tuned
    for name in ("snapkv", "tova", "snapkv+keepkv", "adakv-snapkv"):
        method = make_method(name)
        assert method.for_query_agnostic() is method


def test_method_without_budget_is_refused():
    with pytest.raises(KeepKVError, match="needs a kv_budget"):
        resolve_method("streamingllm", None, {})


def test_composition_is_an_object_the_name_parses_into():
    """``adakv-snapkv+keepkv`` is ``Selected(selector=SnapKV(head_budgets="adakv"), merger=KeepKV())``: the same
    options; budgets, protection and selection from the selector, the decode schedule from the merger; a merging
    method cannot select."""
    from keepkv.cache.compose import Selected
    from keepkv.cache.methods.keepkv import KeepKV
    from keepkv.cache.methods.snapkv import SnapKV

    built = Selected(selector=SnapKV(window=8, head_budgets="adakv"), merger=KeepKV(window=8))
    parsed = make_method("adakv-snapkv+keepkv", window=8)
    assert built == parsed and built.options() == parsed.options()
    assert built != make_method("snapkv+keepkv", window=8)
    assert built.protected_entries == 8 and built.query_window == 8  # SnapKV protects no sinks
    assert built.slots_for_budget(64) == 128 and built.compresses_during_decode  # Ada-KV slots; KeepKV's schedule
    assert not built.needs_accumulated_attention and make_method("h2o+keepkv").needs_accumulated_attention
    assert built.name == "keepkv"
    with pytest.raises(KeepKVError, match="not a plain eviction method"):
        Selected(selector=KeepKV(), merger=KeepKV())


def test_the_full_cache_is_a_method_the_one_manager_never_compresses():
    """``FullCache`` through the one :class:`CacheManager`: full-size buffers without observation state, no budget,
    ``make_room`` never compresses (an overflow is an error), and ``compress`` refuses; a compressing method
    without a budget is refused before anything is allocated."""
    import torch

    from keepkv.cache.kv_cache import LayerKVCache
    from keepkv.cache.manager import CacheManager
    from tests.conftest import tiny_config

    config, cpu = tiny_config(), torch.device("cpu")
    manager = CacheManager(config, torch.float32, cpu, make_method("full"))
    caches = manager.allocate(1, 100, 10, 16)
    assert manager.keeps_everything and manager.budget is None and not manager.compresses_during_prefill
    assert all(type(cache) is LayerKVCache and cache.capacity == 256 for cache in caches)
    manager.wrote(100)
    assert manager.make_room(156) is caches and manager.end_prefill() is caches and manager.compressions == 0
    with pytest.raises(RuntimeError, match="cache overflow"):
        manager.make_room(157)
    with pytest.raises(KeepKVError, match="never compressed"):
        FullCache().compress(caches[0], 0, 10)
    observing = CacheManager(config, torch.float32, cpu, FullCache(observe_window=8, accumulate_attention=True))
    shared = observing.allocate(1, 100, 10, 16)[0]
    assert shared.window_queries.shape[2] == 8 and shared.accumulated_attention.shape[-1] == shared.capacity
    with pytest.raises(KeepKVError, match="needs a kv_budget"):
        CacheManager(config, torch.float32, cpu, make_method("snapkv"))


def test_the_full_cache_ignores_compression_settings_and_refuses_the_oracle_schedule():
    """``load(kv_budget=1.0, decode_slack=8, prefill_compression="once")`` ignores both (load's contract): engines
    built from that model (chat, ``model.prefill``, serve variants) start from the defaults."""
    import torch

    from keepkv.cache.manager import DEFAULT_DECODE_SLACK, CacheManager
    from tests.conftest import tiny_config

    manager = CacheManager(tiny_config(), torch.float32, torch.device("cpu"), FullCache(), 1.0, 8, "once")
    assert (manager.decode_slack, manager.prefill_compression) == (DEFAULT_DECODE_SLACK, "chunked")
    with pytest.raises(KeepKVError, match="never compressed"):
        manager.compress_inside_next_forward()
