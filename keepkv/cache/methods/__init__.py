"""The registry of KV-compression methods: one file per method, one line here.

``make_method(name, **options)`` builds a method from its name and hyper-parameters; ``"full"`` is the
uncompressed cache (:class:`~keepkv.cache.methods.full.FullCache`, no options; not in :data:`METHODS`, the
compressing methods). It is a thin parser for the command line, ``load()`` and the eval;
in code, build the objects directly. Two name forms build variants:

- ``"adakv-X"``: ``X(head_budgets="adakv")``, method ``X`` with Ada-KV head-adaptive budgets (scorers only);
- ``"X+keepkv"``: ``Selected(selector=X(...), merger=KeepKV(...))`` (:class:`keepkv.cache.compose.Selected`),
  KeepKV merging what the eviction method ``X`` evicts (``X`` may itself be ``adakv-Y``), e.g.
  ``"snapkv+keepkv"``, ``"adakv-criticalkv+keepkv"``. Each option goes to whichever of the two takes it (both
  for ``sinks`` / ``window``: the selector protects, KeepKV's window sets its reference queries).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keepkv.cache.compose import Selected
from keepkv.cache.methods.cam import CaM
from keepkv.cache.methods.criticalkv import CriticalKV
from keepkv.cache.methods.d2o import D2O
from keepkv.cache.methods.full import FullCache
from keepkv.cache.methods.h2o import H2O
from keepkv.cache.methods.keepkv import KeepKV
from keepkv.cache.methods.pyramidkv import PyramidKV
from keepkv.cache.methods.snapkv import SnapKV
from keepkv.cache.methods.streamingllm import StreamingLLM
from keepkv.cache.methods.tova import TOVA
from keepkv.cache.methods.weightedkv import WeightedKV
from keepkv.cache.policy import CompressionMethod
from keepkv.errors import KeepKVError, suggest

METHODS: dict[str, type[CompressionMethod]] = {
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "tova": TOVA,
    "pyramidkv": PyramidKV,
    "criticalkv": CriticalKV,
    "weightedkv": WeightedKV,
    "cam": CaM,
    "d2o": D2O,
    "keepkv": KeepKV,
}
FULL = "full"
ADAKV_PREFIX = "adakv-"
MERGER_SUFFIX = "+keepkv"


def available_methods() -> list[str]:
    return [FULL, *METHODS]


def option_names(method_class: type[CompressionMethod]) -> set[str]:
    return {field.name for field in dataclasses.fields(method_class)}


def can_select_for_keepkv(method_class: type[CompressionMethod]) -> bool:
    """Plain eviction methods (not merging ones, not KeepKV itself) can pick what KeepKV merges."""
    return method_class.is_eviction_selector and method_class is not KeepKV


def _unknown_method(name: str) -> KeepKVError:
    return KeepKVError(
        f"unknown method {name!r}; available: {', '.join(available_methods())} (variants: adakv-X for head-adaptive "
        f"budgets of a scorer, X+keepkv to merge what X evicts).{suggest(name, available_methods())}"
    )


def _method_class(key: str, name: str) -> type[CompressionMethod]:
    if key not in METHODS:
        raise _unknown_method(name)
    return METHODS[key]


def _build(key: str, name: str, options: dict[str, Any]) -> CompressionMethod:
    """``X`` or ``adakv-X`` with its options (unknown options are an error naming the allowed ones)."""
    if key.startswith(ADAKV_PREFIX):
        base_key = key[len(ADAKV_PREFIX):]
        method_class = _method_class(base_key, name)
        if "head_budgets" not in option_names(method_class):
            scorers = [k for k, c in METHODS.items() if "head_budgets" in option_names(c)]
            raise KeepKVError(f"{base_key!r} has no Ada-KV variant; adakv-X takes X in: {', '.join(scorers)}")
        if options.get("head_budgets", "adakv") != "adakv":
            raise KeepKVError(f"{key!r} means head_budgets='adakv'; got head_budgets={options['head_budgets']!r}")
        options = {**options, "head_budgets": "adakv"}
        key = base_key
    method_class = _method_class(key, name)
    allowed = option_names(method_class)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise KeepKVError(
            f"method {key!r} does not take option(s) {', '.join(unknown)}; its options are: {', '.join(sorted(allowed))}"
        )
    return method_class(**options)


def make_method(name: str, **options: Any) -> CompressionMethod:
    """The method called ``name`` with ``options`` (its dataclass fields); :class:`FullCache` for ``"full"``
    (module docstring)."""
    key = name.lower()
    if key == FULL:
        if options:
            raise KeepKVError(f"method 'full' takes no options, got {', '.join(sorted(options))}")
        return FullCache()
    if "+" not in key:
        return _build(key, name, options)
    selector_key, _, merger_key = key.partition("+")
    if f"+{merger_key}" != MERGER_SUFFIX or not selector_key:
        raise KeepKVError(
            f"cannot compose {name!r}: the form is X+keepkv (X an eviction method, e.g. snapkv+keepkv)"
        )
    selector_class = _method_class(selector_key.removeprefix(ADAKV_PREFIX), name)
    if not can_select_for_keepkv(selector_class):
        selectors = [k for k, c in METHODS.items() if can_select_for_keepkv(c)]
        raise KeepKVError(f"{selector_key!r} merges by itself and cannot select for keepkv; X+keepkv takes X in: "
                          f"{', '.join(selectors)}")
    merger_options = option_names(KeepKV)
    selector_options = option_names(selector_class) | ({"head_budgets"} if selector_key.startswith(ADAKV_PREFIX)
                                                       else set())
    unknown = sorted(set(options) - merger_options - selector_options)
    if unknown:
        raise KeepKVError(
            f"{key!r} does not take option(s) {', '.join(unknown)}; keepkv's options are: "
            f"{', '.join(sorted(merger_options))}; {selector_key}'s: {', '.join(sorted(selector_options))}"
        )
    selector = _build(selector_key, name, {k: v for k, v in options.items() if k in selector_options})
    merger = KeepKV(**{k: v for k, v in options.items() if k in merger_options})
    return Selected(selector=selector, merger=merger)
