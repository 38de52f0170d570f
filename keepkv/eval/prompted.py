"""The shared runner of NIAH and QA: one full prefill per cell group, then per method and budget compress a copy,
feed the rest of the prompt, decode greedily, score (see :mod:`keepkv.eval.session`).

Three protocols (spec ``evaluation.md``; the first two always reported side by side):

- ``agnostic`` (kvpress's setting): the context is compressed before the question is read; the question is fed
  after the compression. Metrics keep their names (``niah_exact_match``).
- ``aware`` (the KeepKV, SnapKV and LongBench setting): the question is part of the compressed prompt; only the
  prompt's last token is fed after the compression (so its logits, and every answer token, come from the
  compressed cache). Metrics get the suffix ``_aware`` (``niah_exact_match_aware``), unit groups ``/aware``.
- ``chunked`` (``generate()`` with the eval's explicit 512-token chunks): the whole prompt, question included, goes
  through the engine's chunked prefill, which compresses whenever ``budget + 512`` slots fill (mid-prompt
  compressions, before the question is read) and once more at its end; no shared prefill. Suffix ``_chunked``.
  ``generate()``'s default (automatic chunks) has room for a long chunk instead (up to 2048: a 2048-token prompt
  is then compressed once, at its end, as in ``aware``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keepkv.eval.data import PromptCell
from keepkv.eval.results import MethodConfig, ResultStore, prompt_digest, unit_key
from keepkv.eval.session import EvalModel

PROTOCOLS = ("agnostic", "aware", "chunked")
METRIC_SUFFIX = {"agnostic": "", "aware": "_aware", "chunked": "_chunked"}


def metric_name(metric: str, protocol: str) -> str:
    """The row metric of ``metric`` measured under ``protocol`` (``niah_exact_match_aware``)."""
    return metric + METRIC_SUFFIX[protocol]


def protocol_of(row: dict[str, Any]) -> str:
    """The protocol of a result row (its ``protocol`` field; rows older than the field: from the metric suffix)."""
    if row.get("protocol"):
        return str(row["protocol"])
    metric = str(row.get("metric", ""))
    return next((p for p, suffix in METRIC_SUFFIX.items() if suffix and metric.endswith(suffix)), "agnostic")


def run_prompted(
    task: str, model: EvalModel, groups: dict[str, list[PromptCell]], configs: list[MethodConfig],
    budgets: list[float], store: ResultStore, score: Callable[[str, PromptCell], dict[str, float]], seed: int,
    decode_slack: int = 64, progress: bool = True, protocol: str = "agnostic",
) -> None:
    """For every group of cells (rows of one batch), every configuration and budget: answer and write rows
    ``{metric: value}`` from ``score(answer_text, cell)``. Finished units are skipped (finished: a row of every
    cell of the group, written from the same prompt tokens, see :meth:`ResultStore.done`); a group whose units are
    all finished is not even prefilled. Order: :func:`priority_plan`. ``protocol``: one of :data:`PROTOCOLS`."""
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if protocol != "agnostic":
        groups = {f"{name}/{protocol}": cells for name, cells in groups.items()}
    plan = priority_plan(configs, budgets)
    digests = {cell.cell: prompt_digest(cell.context_ids, cell.question_ids) for cells in groups.values()
               for cell in cells}
    expected = {g: {cell.cell: digests[cell.cell] for cell in cells} for g, cells in groups.items()}
    units = [(b, c, g) for c, b in plan for g in groups]
    todo = [(b, c, g) for b, c, g in units if not store.done(unit_key(task, model.name, c, b, g), expected[g])]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=f"{task} {model.name}",
               disable=not progress, unit="run")
    # every group is prefilled once, up front (memory: a few full caches), so the loop can go budget-major:
    # an interrupted run still has complete comparisons (every configuration, every cell) at the first budgets
    prefills = {}
    for group in groups if protocol != "chunked" else ():
        pending = [c for b, c, g in todo if g == group]
        if pending:
            bar.set_postfix_str(f"prefill {group}")
            prefills[group] = model.shared_prefill([compressed_part(cell, protocol) for cell in groups[group]], pending)
    for budget, config, group in todo:
        cells = groups[group]
        bar.set_postfix_str(f"{group} {config.label} {budget}")
        max_new_tokens = max(cell.max_new_tokens for cell in cells)
        if protocol == "chunked":
            answers, kept = model.answer_chunked([cell.context_ids + cell.question_ids for cell in cells], config,
                                                 budget, max_new_tokens, decode_slack=decode_slack)
        else:
            answers, kept = model.answer(prefills[group], config, budget, [fed_part(cell, protocol) for cell in cells],
                                         max_new_tokens, decode_slack=decode_slack,
                                         query_agnostic=protocol == "agnostic")
        rows: list[dict[str, Any]] = []
        for cell, ids in zip(cells, answers):
            text = model.tokenizer.decode(ids)
            for metric, value in score(text, cell).items():
                rows.append({
                    "metric": metric_name(metric, protocol), "protocol": protocol, "value": value,
                    "model": model.name, **config.row_fields(),
                    "budget": budget, "kept_entries_per_head": kept,
                    "cell": cell.cell, "prompt_digest": digests[cell.cell], "seed": seed, "answer": text,
                    "context_tokens": len(cell.context_ids),
                    "decode_slack": decode_slack, **{k: v for k, v in cell.extra.items()},
                })
        store.write(task, unit_key(task, model.name, config, budget, group), rows)
        bar.update(1)
    bar.close()


def compressed_part(cell: PromptCell, protocol: str) -> list[int]:
    """The tokens prefilled and then compressed: the context (agnostic) or all but the prompt's last token."""
    return cell.context_ids if protocol == "agnostic" else cell.context_ids + cell.question_ids[:-1]


def fed_part(cell: PromptCell, protocol: str) -> list[int]:
    """The tokens fed after the compression: the question (agnostic) or the prompt's last token (aware)."""
    return cell.question_ids if protocol == "agnostic" else cell.question_ids[-1:]


BUDGET_PRIORITY = (0.1, 0.2, 0.05, 0.5)


def priority_plan(configs: list[MethodConfig], budgets: list[float]) -> list[tuple[MethodConfig, float]]:
    """``(configuration, budget)`` pairs, budget-major (10%, 20%, 5%, 50%, then others; ``full`` once, first).
    Configurations that build the same method (the default written out, or twice) run once."""
    ordered = sorted(budgets, key=lambda b: BUDGET_PRIORITY.index(b) if b in BUDGET_PRIORITY else len(BUDGET_PRIORITY))
    distinct = {}
    for config in configs:
        distinct.setdefault((config.method, config.variant, tuple(config.resolved_options().items())), config)
    configs = list(distinct.values())
    plan = [(c, 1.0) for c in configs if c.is_full]
    plan += [(c, b) for b in ordered for c in configs if not c.is_full]
    return plan
