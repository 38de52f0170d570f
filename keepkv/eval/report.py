"""``keepkv eval report``: one Markdown table + plots from a results directory (every ``*.jsonl`` below it,
peer engines' rows included), and optionally the README block between ``<!-- eval:begin`` and ``<!-- eval:end -->``.

Aggregation: rows of one (engine, model, method, variant, budget, task, metric) are averaged over cells; the
perplexity ratio is ``ppl / ppl_full`` per document (same model, same document), then averaged. Written files:
``REPORT.md`` (the full table and the computed findings), ``summary_<model>.png`` (each metric vs budget, one line
per method), ``niah_<model>.png`` (accuracy heatmaps depth x length per method and budget) and
``fidelity_layers_<model>.png`` (per-layer attention-output error at 10%).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from statistics import mean
from typing import Any

from keepkv.eval.results import SELECTION_ONLY_OPTIONS, options_added_later, read_rows

# (column title, task, metric, higher is better, format)
COLUMNS = [
    ("attn rel-L2", "fidelity", "attn_rel_l2", False, "{:.3f}"),
    ("KL", "fidelity", "kl", False, "{:.3f}"),
    ("top-1", "fidelity", "top1", True, "{:.2f}"),
    ("ppl ratio", "ppl", "ppl_ratio", False, "{:.3f}"),
    ("NIAH EM", "niah", "niah_exact_match", True, "{:.2f}"),
    ("NIAH EM (aware)", "niah", "niah_exact_match_aware", True, "{:.2f}"),
    ("NIAH digits", "niah", "niah_digits", True, "{:.2f}"),
    ("NIAH digits (aware)", "niah", "niah_digits_aware", True, "{:.2f}"),
    ("QA F1", "qa", "qa_f1", True, "{:.2f}"),
]
HEADLINE = [c for c in COLUMNS if c[2] in ("kl", "ppl_ratio", "niah_exact_match", "niah_exact_match_aware", "qa_f1")]
README_BEGIN = re.compile(r"(<!-- eval:begin[^\n]*-->\n)(.*?)(<!-- eval:end -->)", re.S)
MERGE_ONLY_OPTIONS = ("reference", "alpha", "max_evicted_weight")
"""KeepKV's options that only its merge reads (the reference scores, the EMA decay behind them, the dominance
guard): they change nothing in a configuration that merges nothing (``similarity_threshold >= 1``: the matching
caps the cosine at 1, so nothing merges, :func:`keepkv.ops.scores.cosine_match`)."""
COMMAND = ("flock /tmp/keepkv-cpu.lock keepkv eval all --grid full --results results/eval --readme README.md")


def label(row: dict[str, Any]) -> str:
    """``method[:variant][@option=value...]``: with ``resolved_options`` in the row, the options that differ from
    the library's current defaults for that method (so ``keepkv:minnorm`` always means today's default and rows
    of an older default show what differs); else the options as written. A KeepKV configuration that merges
    nothing (``similarity_threshold >= 1``: its own base selector) is labelled without the options only a merge
    reads (:data:`MERGE_ONLY_OPTIONS`), so runs made under different merge defaults share one label, as they
    share every number; likewise a composition ``X+keepkv`` without KeepKV's selection options
    (:data:`~keepkv.eval.results.SELECTION_ONLY_OPTIONS`). A row written before an option existed reads that
    option at its earlier behaviour (:func:`_behaviour_before_options`), and a number is written in the type of
    today's default (``0`` and ``0.0`` of a float option are one label). Peer engines' rows get ``[engine]``."""
    name = row["method"] if not row.get("variant") else f"{row['method']}:{row['variant']}"
    options = row.get("options") or {}
    if row.get("resolved_options"):
        defaults = _current_defaults(row["method"], row.get("variant", ""))
        resolved = {**_behaviour_before_options(row, defaults), **row["resolved_options"]}
        if "keepkv" in row["method"].split("+") and float(resolved.get("similarity_threshold", 0.0)) >= 1.0:
            resolved.update({key: defaults[key] for key in MERGE_ONLY_OPTIONS if key in defaults})
        if row["method"].endswith("+keepkv"):
            resolved.update({key: defaults[key] for key in SELECTION_ONLY_OPTIONS if key in defaults})
        resolved = {key: _in_type_of(value, defaults.get(key)) for key, value in resolved.items()}
        options = {k: v for k, v in resolved.items() if k != "variant" and defaults.get(k) != v}
    name += "".join(f"@{key}={value}" for key, value in sorted(options.items()))
    return name if row.get("engine", "keepkv") == "keepkv" else f"{name} [{row['engine']}]"


def compressed_before_question(row: dict[str, Any]) -> bool:
    """Whether the row's compression ran before its question was read (the query-agnostic protocol of the
    prompted tasks: ``tasks``, ``niah``, ``qa``)."""
    from keepkv.eval.prompted import protocol_of

    return row.get("task") in ("tasks", "niah", "qa") and protocol_of(row) == "agnostic"


def _in_type_of(value: Any, default: Any) -> Any:
    """``value`` as a float when today's default is a float (``0`` -> ``0.0``), as an int when the default is an
    int and the value an integral float; anything else (booleans, strings, no default) unchanged. New rows hold
    their options in the field's type already (``keepkv.cache.policy.CompressionMethod.__post_init__``); rows
    stored before that may not."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _behaviour_before_options(row: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """For a row written before an option existed, the value of that option that reproduces what the row ran, so
    its label does not pass for today's default: each option of
    :func:`keepkv.eval.results.options_added_later` the method has today at its earlier behaviour, and KeepKV
    rows compressed before the question without ``agnostic_last_query_weight`` ranked with their
    ``last_query_weight``."""
    resolved = row["resolved_options"]
    before = {name: value for name, value in options_added_later(row["method"]).items() if name in defaults}
    if row["method"] == "keepkv" and "agnostic_last_query_weight" not in resolved and compressed_before_question(row):
        before["agnostic_last_query_weight"] = resolved.get("last_query_weight", 0.0)
    return before


@lru_cache(maxsize=None)
def _current_defaults_cached(method: str, variant: str) -> tuple[tuple[str, Any], ...]:
    from keepkv.eval.results import MethodConfig

    return tuple(MethodConfig(method, variant).resolved_options().items())


def _current_defaults(method: str, variant: str) -> dict[str, Any]:
    return dict(_current_defaults_cached(method, variant))


def is_peer(lab: str) -> bool:
    """A label :func:`label` made for another engine's row (``"snapkv [kvpress]"``)."""
    return lab.endswith("]") and " [" in lab


def is_keepkv(lab: str) -> bool:
    """A KeepKV configuration of keepkv's own (``keepkv:...``, ``X+keepkv:...``), any options."""
    name = lab.split("@", 1)[0].split(":", 1)[0]
    return not is_peer(lab) and (name == "keepkv" or name.endswith("+keepkv"))


def is_full(lab: str) -> bool:
    """The uncompressed reference of any engine (``full``, ``full [kvpress]``)."""
    return lab.split(" [", 1)[0] == "full"


def _budget(row: dict[str, Any]) -> float:
    return float(row["budget"])


def bootstrap_interval(values: list[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (:func:`keepkv.eval.bootstrap.mean_interval`)."""
    from keepkv.eval.bootstrap import mean_interval

    return mean_interval(values, level, seed)


def distinct_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (engine, task, model, configuration, budget, cell, metric), the last one written: a unit that
    ran twice (the same configuration written two ways) must not count its cells twice in a mean or an interval."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r.get("engine", "keepkv"), r.get("task"), r["model"], label(r), _budget(r), r["cell"], r["metric"])
        latest[key] = r
    return list(latest.values())


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """``(model, label, budget, metric) -> {"value", "kept", "n", "low", "high"}`` (``low``/``high``: the 95%
    bootstrap interval of the mean over cells); adds ``ppl_ratio``."""
    rows = list(rows)
    full_ppl = {(r["engine"], r["model"], r["cell"]): r["value"] for r in rows
                if r["task"] == "ppl" and r["metric"] == "ppl" and r["method"] == "full"}
    derived = []
    for r in rows:
        if r["task"] == "ppl" and r["metric"] == "ppl":
            reference = full_ppl.get((r["engine"], r["model"], r["cell"])) or full_ppl.get(("keepkv", r["model"], r["cell"]))
            if reference:
                derived.append({**r, "metric": "ppl_ratio", "value": r["value"] / reference})
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in distinct_rows(rows + derived):
        groups[(r["model"], label(r), _budget(r), r["metric"])].append(r)
    summary = {}
    for key, group in groups.items():
        values = [float(r["value"]) for r in group]
        low, high = bootstrap_interval(values)
        summary[key] = {"value": mean(values), "kept": mean(float(r["kept_entries_per_head"]) for r in group),
                        "n": len(group), "low": low, "high": high}
    return summary


def with_interval(entry: dict[str, Any], fmt: str) -> str:
    """``0.42 [0.30, 0.55] (n=40)`` for an aggregate entry, or just the value when it has one cell."""
    if entry["n"] < 2:
        return fmt.format(entry["value"])
    return (f"{fmt.format(entry['value'])} [{fmt.format(entry['low'])}, {fmt.format(entry['high'])}] "
            f"(n={entry['n']})")


def compact_interval(entry: dict[str, Any], fmt: str) -> str:
    """``0.42±0.12`` (the larger half-width of the 95% bootstrap interval), or the value alone for one cell."""
    if entry["n"] < 2:
        return fmt.format(entry["value"])
    half = max(entry["value"] - entry["low"], entry["high"] - entry["value"])
    return f"{fmt.format(entry['value'])}±{fmt.format(half)}"


def _order(labels: set[str]) -> list[str]:
    from keepkv.eval.grid import ALL_CONFIGS
    from keepkv.eval.results import MethodConfig

    known = [MethodConfig.parse(c).label for c in ALL_CONFIGS]
    return sorted(labels, key=lambda x: (known.index(x) if x in known else len(known), x))


def full_table(agg: dict[tuple, dict[str, Any]]) -> str:
    keys = sorted({(m, lab, b) for m, lab, b, _ in agg})
    models = sorted({k[0] for k in keys})
    lines = ["| model | method | budget | kept / head | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for model in models:
        labels = _order({lab for m, lab, _ in keys if m == model})
        for lab in labels:
            for budget in sorted({b for m, l2, b in keys if m == model and l2 == lab}):
                cells, kept = [], []
                for _, task, metric, _, fmt in COLUMNS:
                    entry = agg.get((model, lab, budget, metric))
                    cells.append(with_interval(entry, fmt) if entry else "")
                    if entry:
                        kept.append(entry["kept"])
                kept_text = f"{mean(kept):.0f}" if kept else ""
                lines.append(f"| {model} | {lab} | {budget:g} | {kept_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_tables(agg: dict[tuple, dict[str, Any]]) -> str:
    """Per model: method x (metric over budgets ``5/10/20/50%``) with compact cells."""
    out = []
    models = sorted({k[0] for k in agg})
    for model in models:
        budgets = sorted({k[2] for k in agg if k[0] == model and k[2] < 1.0})
        labels = _order({k[1] for k in agg if k[0] == model})
        head = " / ".join(f"{b * 100:g}%" for b in budgets)
        out.append(f"**{model}** (each cell: budget {head}, mean ± the half-width of its 95% bootstrap interval over "
                   "cells; `full` = uncompressed)\n")
        out.append("| method | " + " | ".join(c[0] for c in HEADLINE) + " |")
        out.append("|---|" + "---|" * len(HEADLINE))
        for lab in labels:
            cells = []
            for _, _, metric, _, fmt in HEADLINE:
                values = []
                for b in ([1.0] if is_full(lab) else budgets):
                    entry = agg.get((model, lab, b, metric))
                    values.append(compact_interval(entry, fmt) if entry else "–")
                cells.append(" / ".join(values))
            out.append(f"| {lab} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _score(agg, model, lab, metric, higher, budgets) -> float | None:
    values = [agg[(model, lab, b, metric)]["value"] for b in budgets if (model, lab, b, metric) in agg]
    if not values:
        return None
    return mean(values) if higher else -mean(values)


def findings(agg: dict[tuple, dict[str, Any]]) -> str:
    """Computed statements: best KeepKV variant, best base selector, where KeepKV loses (mean over budgets)."""
    lines = []
    models = sorted({k[0] for k in agg})
    metrics = [(c[2], c[3], c[0]) for c in HEADLINE]
    variants = ["keepkv:zip", "keepkv:convex", "keepkv:keep-key", "keepkv:minnorm"]
    selector_groups = {
        variant: [f"keepkv:{variant}", f"snapkv+keepkv:{variant}", f"criticalkv+keepkv:{variant}"]
        for variant in ("zip", "minnorm")
    }
    selectors = [c for group in selector_groups.values() for c in group]
    comparisons = [("KeepKV merge variant", variants)] + [
        (f"base selector for KeepKV ({variant} merge)", group) for variant, group in selector_groups.items()
    ]
    for title, candidates in comparisons:
        wins: dict[str, int] = defaultdict(int)
        detail = []
        for model in models:
            budgets = sorted({k[2] for k in agg if k[0] == model and k[2] < 1.0})
            for metric, higher, name in metrics:
                scores = {c: _score(agg, model, c, metric, higher, budgets) for c in candidates}
                scores = {c: s for c, s in scores.items() if s is not None}
                if len(scores) < 2:
                    continue
                best = max(scores, key=scores.get)
                if sum(1 for v in scores.values() if math.isclose(v, scores[best], abs_tol=1e-9)) > 1:
                    detail.append(f"{model.split('-')[0]} {name}: tie at {abs(scores[best]):.3f} (no win counted; "
                                  + ", ".join(f"{c} {abs(v):.3f}" for c, v in scores.items()) + ")")
                    continue
                wins[best] += 1
                detail.append(f"{model.split('-')[0]} {name}: {best} "
                              f"({abs(scores[best]):.3f} vs {', '.join(f'{c} {abs(s):.3f}' for c, s in scores.items() if c != best)})")
        if wins:
            ranking = sorted(wins.items(), key=lambda kv: -kv[1])
            lines.append(f"- Best {title} (wins over models x metrics, mean over budgets): "
                         + ", ".join(f"`{c}` {n}" for c, n in ranking) + ".")
            lines.extend(f"  - {d}" for d in detail)
    keepkv_family = sorted({k[1] for k in agg if is_keepkv(k[1])} | set(variants + selectors))
    losses = []
    for model in models:
        budgets = sorted({k[2] for k in agg if k[0] == model and k[2] < 1.0})
        # keepkv's own implementations only (peer engines' rows validate them, they are not other methods)
        others = sorted({k[1] for k in agg if k[0] == model and not is_peer(k[1]) and not is_full(k[1])}
                        - set(keepkv_family))  # ties: first by name
        for metric, higher, name in metrics:
            for b in budgets:
                ours = {c: agg[(model, c, b, metric)]["value"] for c in keepkv_family if (model, c, b, metric) in agg}
                theirs = {c: agg[(model, c, b, metric)]["value"] for c in others if (model, c, b, metric) in agg}
                if not ours or not theirs:
                    continue
                pick = max if higher else min
                best_ours = pick(ours, key=ours.get)
                best_theirs = pick(theirs, key=theirs.get)
                better = theirs[best_theirs] > ours[best_ours] if higher else theirs[best_theirs] < ours[best_ours]
                if better:
                    losses.append(f"{model.split('-')[0]} {name} @{b * 100:g}%: {best_theirs} "
                                  f"{theirs[best_theirs]:.3f} vs best KeepKV {best_ours} {ours[best_ours]:.3f}")
    if losses:
        lines.append(f"- Where every KeepKV configuration loses to some other method ({len(losses)} model x metric x "
                     "budget cells):")
        lines.extend(f"  - {x}" for x in losses)
    return "\n".join(lines)


def plot_summary(agg, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 4.5))
    labels = _order({k[1] for k in agg if k[0] == model})
    cmap = plt.get_cmap("tab20")
    for ax, (title, _, metric, _, _) in zip(axes, HEADLINE):
        for i, lab in enumerate(labels):
            points = sorted((k[2], v["value"]) for k, v in agg.items() if k[0] == model and k[1] == lab
                            and k[3] == metric and k[2] < 1.0)
            if is_full(lab):
                entry = agg.get((model, lab, 1.0, metric))
                if entry:
                    ax.axhline(entry["value"], color="black", linestyle="--" if lab == "full" else ":", linewidth=1,
                               label=lab)
                continue
            if points:
                style = "-" if "keepkv" in lab else ":"
                ax.plot([p[0] * 100 for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                        color=cmap(i % 20), label=lab)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the budget ticks, no 3x10^1 labels
        ax.set_xticks([5, 10, 20, 50])
        ax.set_xticklabels(["5", "10", "20", "50"])
        ax.set_xlabel("budget (% of context)")
        ax.set_title(title)
        if metric == "ppl_ratio":
            ax.set_yscale("log")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if handles:
        axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="center left",
                        bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(model)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def niah_length(row: dict[str, Any]) -> int:
    """The target context length of a NIAH row: ``target_tokens``, else the ``ctx<L>`` of its cell name (the
    grouping :func:`keepkv.eval.niah.niah_cells` writes, also in peer rows), else the measured ``context_tokens``."""
    if row.get("target_tokens") is not None:
        return int(row["target_tokens"])
    match = re.match(r"ctx(\d+)/", str(row.get("cell", "")))
    return int(match.group(1)) if match else int(row.get("context_tokens") or 0)


def niah_heatmap(rows: list[dict[str, Any]], model: str, path: Path) -> bool:
    """Accuracy heatmaps (depth x context length), one panel per method and budget; False if no NIAH rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data: dict[tuple[str, float], dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task"] == "niah" and r["model"] == model and r["metric"] == "niah_exact_match":
            depth = float(r.get("depth", 0.0))
            length = niah_length(r)
            data[(label(r), _budget(r))][(depth, length)].append(float(r["value"]))
    if not data:
        return False
    labels = _order({k[0] for k in data})
    budgets = sorted({k[1] for k in data})
    depths = sorted({d for cells in data.values() for d, _ in cells})
    lengths = sorted({n for cells in data.values() for _, n in cells})
    fig, axes = plt.subplots(len(labels), len(budgets), figsize=(1.6 * len(budgets) + 1, 1.1 * len(labels) + 1),
                             squeeze=False)
    for i, lab in enumerate(labels):
        for j, b in enumerate(budgets):
            ax = axes[i][j]
            cells = data.get((lab, b))
            grid = [[mean(cells[(d, n)]) if cells and (d, n) in cells else float("nan") for n in lengths]
                    for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)))
            ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths], fontsize=6)
            ax.set_yticks(range(len(depths)))
            ax.set_yticklabels([f"{d * 100:g}%" for d in depths], fontsize=6)
            if i == 0:
                ax.set_title("full" if b == 1.0 else f"{b * 100:g}%", fontsize=8)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"NIAH exact match, {model} (rows: depth, columns: context length)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_fidelity_layers(rows: list[dict[str, Any]], model: str, path: Path, budget: float = 0.1) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[float]]] = defaultdict(list)
    for r in rows:
        if (r["task"] == "fidelity" and r["model"] == model and r["metric"] == "attn_rel_l2"
                and math.isclose(_budget(r), budget) and "per_layer" in r):
            curves[label(r)].append(r["per_layer"])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap = plt.get_cmap("tab20")
    for i, lab in enumerate(_order(set(curves))):
        per_layer = [mean(v) for v in zip(*curves[lab])]
        ax.plot(per_layer, "-" if "keepkv" in lab else ":", color=cmap(i % 20), label=lab)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("rel. L2 of attention output (after W_O)")
    ax.set_title(f"{model}: attention-output perturbation per layer at {budget * 100:g}% (mean over decode steps)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", model)


def write_report(results: str | Path, readme: str | Path | None = None) -> Path:
    """Write ``REPORT.md`` and the PNGs into ``results``; rewrite ``readme``'s eval block if given."""
    results = Path(results)
    rows = list(read_rows(results))
    agg = aggregate([r for r in rows if r.get("task") != "tasks"])  # the tasks' own section: tasks_report.py
    models = sorted({k[0] for k in agg})
    images = []
    for model in models:
        slug = _slug(model)
        plot_summary(agg, model, results / f"summary_{slug}.png")
        images.append(f"summary_{slug}.png")
        if niah_heatmap(rows, model, results / f"niah_{slug}.png"):
            images.append(f"niah_{slug}.png")
        if plot_fidelity_layers(rows, model, results / f"fidelity_layers_{slug}.png"):
            images.append(f"fidelity_layers_{slug}.png")
    # -- RULER-style tasks (keepkv/eval/tasks_report.py) --
    from keepkv.eval.tasks_report import tasks_section

    task_lines, task_images = tasks_section(rows, results)
    images += task_images
    # -- end tasks --
    engines = sorted({r["engine"] for r in rows})
    versions = sorted({(r["keepkv_version"], r["torch_version"]) for r in rows})
    body = [
        "# keepkv eval report", "",
        f"Generated by `keepkv eval report --results {results}` from {len(rows)} result rows "
        f"(engines: {', '.join(engines) or 'none'}; keepkv / torch: "
        f"{', '.join(f'{k} / {t}' for k, t in versions)}). Protocols: `keepkv/eval/*.py` docstrings and `RUN.md`.", "",
        "## Findings (computed from the table)", "", findings(agg) or "(no data)", "",
        "## Headline", "", headline_tables(agg), *task_lines, "## Every number", "", full_table(agg), "",
        "## Plots", "", *[f"![{name}]({name})" for name in images], "",
    ]
    path = results / "REPORT.md"
    path.write_text("\n".join(body), encoding="utf-8")
    if readme is not None:
        update_readme(readme, results, agg, images)
    return path


def update_readme(readme: str | Path, results: Path, agg, images: list[str]) -> None:
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    match = README_BEGIN.search(text)
    if match is None:
        from keepkv.errors import KeepKVError

        raise KeepKVError(f"{readme} has no '<!-- eval:begin ... -->' ... '<!-- eval:end -->' block")
    try:
        rel = results.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        rel = results
    block = [
        f"Regenerated by `{COMMAND}` (resumable; wall time per model and task in `{rel}/walltime.log`; "
        f"`--grid quick` for a smoke run; "
        f"`keepkv eval report --results {rel} --readme README.md` redraws from the committed JSON lines). "
        f"Protocol, command, wall time and versions: [`{rel}/RUN.md`]({rel}/RUN.md); every number: "
        f"[`{rel}/REPORT.md`]({rel}/REPORT.md).", "",
        "KL: mean next-token KL to the full cache over 16 decode steps after one compression; ppl ratio: "
        "perplexity with streaming compression / full; NIAH EM: needle exact match (3 depths x 2 lengths); "
        "QA F1: SQuAD v2 among distractors. The budget is a fraction of the context; the kept entries per head "
        "actually measured are in REPORT.md.", "",
        headline_tables(agg), "### Findings (computed)", "", findings(agg) or "(no data)", "",
        *[f"![{name}]({rel}/{name})" for name in images if name.startswith("summary")], "",
    ]
    new = text[: match.start(2)] + "\n".join(block) + "\n" + text[match.end(2):]
    readme.write_text(new, encoding="utf-8")
