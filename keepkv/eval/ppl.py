"""Perplexity with streaming compression (``keepkv eval ppl``; WeightedKV's protocol, ``evaluation.md``).

Each real document (The Jargon File, the GNU GPL-3; :func:`keepkv.eval.data.ppl_documents`) is cut to its first
``tokens`` tokens and teacher-forced through the cache in chunks of ``chunk`` tokens (the engine's chunked
prefill with ``prefill_chunk_size = chunk``): the budget ``B = ceil(budget * tokens)`` is fixed for the document,
the buffer holds ``B + chunk`` slots, and whenever the next chunk would not fit the method compresses every layer
back to ``B``. So the cache is held at the budget throughout and every method sees the same tokens; chunked
teacher forcing costs about one prefill per configuration instead of one decode step per token. Every method
compresses on this schedule, SnapKV / PyramidKV included (they are "compress once" only in decoding).

Rows: ``ppl = exp(mean_t -ln p(x_t | x_<t))`` over positions 1..T-1 of each document; the report divides by the
full cache's ``ppl`` on the same document (``ppl ratio``). ``kept_entries_per_head``: entries after a final
compression to the budget.
"""

from __future__ import annotations

import math

import torch

from keepkv.eval.data import ppl_documents
from keepkv.eval.metrics import negative_log_likelihoods
from keepkv.eval.results import MethodConfig, ResultStore, unit_key


def document_ids(tokenizer, tokens: int, count: int) -> dict[str, list[int]]:
    docs = {}
    for name, text in ppl_documents()[:count]:
        ids = tokenizer.encode(text[: tokens * 8])
        docs[f"{name}{tokens}"] = ids[:tokens]
    return docs


def streaming_nll(model, config: MethodConfig, budget: float, ids: list[int], chunk: int) -> tuple[float, float]:
    """(mean negative log-likelihood, kept entries per head) of one document through one configuration."""
    engine = model.engine_for(config, budget, prefill_chunk_size=chunk)
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.arange(len(ids), device=model.device)[None]
    engine.prepare_caches(1, len(ids), 0)
    total, count = 0.0, 0
    for start in range(0, len(ids), chunk):
        piece = slice(start, start + chunk)
        logits = engine.extend(input_ids[:, piece], positions[:, piece], valid[:, piece])
        targets = input_ids[:, start + 1: start + 1 + chunk]
        nll = negative_log_likelihoods(logits[:, : targets.shape[1]], targets)
        total += float(nll.sum())
        count += targets.numel()
    manager = engine.cache_manager
    if not config.is_full:
        manager.compress_all()
    kept = float(manager.entries_per_head().float().mean())
    return total / count, kept


def run_ppl(model, configs: list[MethodConfig], budgets: list[float], tokens: int, documents: int,
            store: ResultStore, chunk: int = 64, seed: int = 0, progress: bool = True) -> None:
    from tqdm import tqdm

    docs = document_ids(model.tokenizer, tokens, documents)
    from keepkv.eval.prompted import priority_plan

    plan = priority_plan(configs, budgets)
    bar = tqdm(total=len(plan) * len(docs), desc=f"ppl {model.name}", disable=not progress, unit="run")
    for config, budget in plan:
        for cell, ids in docs.items():
            unit = unit_key("ppl", model.name, config, budget, cell)
            if not store.done(unit):
                bar.set_postfix_str(f"{cell} {config.label} {budget}")
                nll, kept = streaming_nll(model, config, budget, ids, chunk)
                store.write("ppl", unit, [{
                    "metric": "ppl", "value": math.exp(nll), "model": model.name, **config.row_fields(),
                    "budget": budget, "kept_entries_per_head": kept, "cell": cell, "seed": seed, "nll": nll,
                    "tokens": len(ids), "chunk": chunk,
                }])
            bar.update(1)
    bar.close()
