"""Needle in a haystack (``keepkv eval niah``).

A seeded 7-digit "special magic number" sentence is inserted at each depth (0 = start, 1 = end, at the nearest
sentence end) of a Paul Graham haystack of each context length (tokens of the compressed context, within a few
tokens); the question comes after the compression (query-agnostic), in the user turn of the chat template; the
answer is decoded greedily (at most 24 tokens) and scored by exact match: the needle's number appears in it
(:func:`keepkv.eval.metrics.needle_found`). The depths of one length form one batch sharing one full prefill
(:mod:`keepkv.eval.session`). Plot: accuracy heatmap (depth x length) per method and budget (:mod:`keepkv.eval.report`).
"""

from __future__ import annotations

from pathlib import Path

from keepkv.eval.data import PromptCell, niah_cell, write_prompts
from keepkv.eval.metrics import needle_digit_recall, needle_found
from keepkv.eval.results import MethodConfig, ResultStore


def niah_cells(tokenizer, lengths: list[int], depths: list[float], seed: int = 0,
               samples: int = 1) -> dict[str, list[PromptCell]]:
    """Groups ``ctx<L>`` (sample 0) and ``ctx<L>/s<k>`` -> the cells of every depth at length ``L``."""
    return {
        f"ctx{length}" + (f"/s{sample}" if sample else ""): [
            niah_cell(tokenizer, length, depth, seed, sample=sample) for depth in depths
        ]
        for length in lengths for sample in range(samples)
    }


def score_niah(answer: str, cell: PromptCell) -> dict[str, float]:
    return {"niah_exact_match": float(needle_found(answer, cell.answers[0])),
            "niah_digits": needle_digit_recall(answer, cell.answers[0])}


def run_niah(model, configs: list[MethodConfig], budgets: list[float], lengths: list[int], depths: list[float],
             store: ResultStore, seed: int = 0, export_prompts: str | Path | None = None, progress: bool = True,
             run: bool = True, protocols: tuple[str, ...] = ("agnostic",), samples: int = 1) -> None:
    """Every (length, depth) cell, every configuration and budget, under each of ``protocols``
    (:data:`keepkv.eval.prompted.PROTOCOLS`)."""
    from keepkv.eval.prompted import run_prompted

    groups = niah_cells(model.tokenizer, lengths, depths, seed, samples)
    if export_prompts:
        write_prompts([cell for cells in groups.values() for cell in cells], export_prompts)
    for protocol in protocols if run else ():
        run_prompted("niah", model, groups, configs, budgets, store, score_niah, seed, progress=progress,
                     protocol=protocol)
