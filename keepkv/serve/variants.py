"""Per-request cache overrides: one :class:`LanguageModel` per ``(method, kv_budget)`` sharing the loaded weights.

A request may name a ``kv_budget`` and/or a ``method`` different from the server's. The cache policy lives in the
engine (:class:`~keepkv.generate.GenerationEngine` + its cache manager), not in the weights, so a variant is a new
:class:`LanguageModel` built on the *same* :class:`~keepkv.models.transformer.Transformer` and tokenizer: no weight
is copied. Variants are built on first use and kept in a small LRU (``max_variants``, the server's own setting
always kept), because each compiled variant compiles its own decode graph on first use (a few seconds warm).
Only the scheduler's worker thread runs a variant, one batch at a time, so sharing the network is safe.

Method hyper-parameters given at start-up (``--method-option``) apply to the server's own setting only; an override
uses the method's defaults (documented in ``docs/scaling.md`` and the README).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from keepkv.cache.budgets import is_full_budget
from keepkv.models.language_model import LanguageModel
from keepkv.models.loading import resolve_method

VariantKey = tuple[str, "float | int | None"]


def variant_key(method: str, kv_budget: float | int | None) -> VariantKey:
    """The canonical key: ``("full", None)`` for every way of asking for the whole cache."""
    if is_full_budget(kv_budget) or method == "full":
        return ("full", None)
    return (method, kv_budget)


class ModelVariants:
    """The base model plus LRU-cached overrides (see the module docstring)."""

    def __init__(self, base: LanguageModel, max_variants: int = 4) -> None:
        self.base = base
        self.max_variants = max(1, max_variants)
        self.base_key = variant_key(base.method, base.kv_budget)
        self._variants: OrderedDict[VariantKey, LanguageModel] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, method: str | None, kv_budget: float | int | None) -> VariantKey:
        """Check an override (:func:`keepkv.models.loading.resolve_method`: a bad name or budget is a
        ``KeepKVError``) and return its key. No override at all is the server's setting; a budget alone keeps
        the server's method (KeepKV when the server runs the full cache)."""
        if method is None and kv_budget is None:
            return self.base_key
        if method is None:
            method = self.base.method if self.base.method != "full" else None
        if kv_budget is None and method is not None and method.lower() not in ("full",):
            kv_budget = self.base.kv_budget
        name, _ = resolve_method(method, kv_budget, {})
        return variant_key(name, kv_budget)

    def get(self, key: VariantKey) -> LanguageModel:
        """The model for ``key`` (built on first use; the least recently used override is dropped past the cap)."""
        if key == self.base_key:
            return self.base
        with self._lock:
            if key in self._variants:
                self._variants.move_to_end(key)
                return self._variants[key]
            method, kv_budget = key
            name, method_object = resolve_method(method, kv_budget, {})
            base = self.base
            manager = base.engine.cache_manager
            variant = LanguageModel(
                base.network, base.tokenizer, name=base.name, source=base.source, method=name, kv_budget=kv_budget,
                compile=base.engine.compile, prefill_chunk_size=base.engine.prefill_chunk_setting,
                method_object=method_object, decode_slack=manager.decode_slack,
                runtime=base.runtime,
            )
            self._variants[key] = variant
            while len(self._variants) > self.max_variants - 1:
                self._variants.popitem(last=False)
            return variant
