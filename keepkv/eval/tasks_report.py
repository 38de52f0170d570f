"""The RULER-style tasks' part of ``REPORT.md`` (:func:`tasks_section`, called by
:func:`keepkv.eval.report.write_report`).

Per model and protocol, one row per (method configuration, budget): the accuracy of every task family (mean over
its samples, lengths pooled; string match or SQuAD F1, :mod:`keepkv.eval.tasks`) with its 95% percentile
bootstrap interval, and the **mean over task families** with a stratified bootstrap interval (each resample draws
every family's samples with replacement within the family, then averages the family means, so a family with more
samples does not weigh more). Plot ``tasks_<model>.png``: the mean over tasks against the budget, one panel per
protocol, one line per method, its interval as error bars.

Peer engines' rows (``engine`` other than ``keepkv``, e.g. kvpress's presses on the same exported samples,
``tools/peers/``) are shown beside keepkv's as ``<press> [<engine>]`` (:func:`keepkv.eval.report.label`), in the
same tables and plots (dash-dot lines).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

METRIC = "task_accuracy"


def task_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The headline-accuracy rows of ``keepkv eval tasks`` (both protocols), one per cell (latest wins)."""
    from keepkv.eval.report import distinct_rows

    from keepkv.eval.prompted import PROTOCOLS, metric_name

    metrics = {metric_name(METRIC, protocol) for protocol in PROTOCOLS}
    picked = [r for r in rows if r.get("task") == "tasks" and r["metric"] in metrics]
    return distinct_rows(picked)


def family_of(row: dict[str, Any]) -> str:
    return str(row.get("family") or str(row["cell"]).split("/", 1)[0])


def protocol_of(row: dict[str, Any]) -> str:
    from keepkv.eval.prompted import protocol_of

    return protocol_of(row)


PANEL_TITLES = {"aware": "query-aware", "agnostic": "query-agnostic", "chunked": "chunked prefill (generate())"}
PROTOCOL_TITLES = {
    "aware": "query-aware: the question is compressed with the context",
    "agnostic": "query-agnostic: the context is compressed before the question is read",
    "chunked": "generate()'s chunked prefill with 512-token chunks: compressed whenever budget + 512 slots fill, question included",
}


def stratified_interval(by_family: dict[str, list[float]], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over families of each family's mean (resampled within families,
    :func:`keepkv.eval.bootstrap.stratified_interval`)."""
    from keepkv.eval.bootstrap import stratified_interval as interval

    if all(len(v) < 2 for v in by_family.values()):
        value = mean(mean(v) for v in by_family.values())
        return value, value
    return interval(by_family, lambda s: mean(mean(v) for v in s.values()), level, seed)


def summarise(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """``(model, protocol, label, budget) -> {"families": {family: (mean, low, high, n)}, "mean": (mean, low,
    high), "kept": mean kept entries per head}``."""
    from keepkv.eval.report import bootstrap_interval, label

    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    kept: dict[tuple, list[float]] = defaultdict(list)
    for r in task_rows(rows):
        key = (r["model"], protocol_of(r), label(r), float(r["budget"]))
        groups[key][family_of(r)].append(float(r["value"]))
        kept[key].append(float(r["kept_entries_per_head"]))
    summary = {}
    for key, by_family in groups.items():
        families = {f: (mean(v), *bootstrap_interval(v), len(v)) for f, v in sorted(by_family.items())}
        overall = mean(m for m, *_ in families.values())
        summary[key] = {"families": families, "mean": (overall, *stratified_interval(by_family)),
                        "kept": mean(kept[key])}
    return summary


def _cell(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def tables(summary: dict[tuple, dict[str, Any]]) -> str:
    from keepkv.eval.report import _order, is_full

    out = []
    for model in sorted({k[0] for k in summary}):
        for protocol, title in PROTOCOL_TITLES.items():
            keys = [k for k in summary if k[0] == model and k[1] == protocol]
            if not keys:
                continue
            families = sorted({f for k in keys for f in summary[k]["families"]})
            counts = sorted({summary[k]["families"][f][3] for k in keys for f in summary[k]["families"]})
            out.append(f"**{model}**, {title} (each cell: mean [95% bootstrap interval]; samples per family cell: "
                       f"{', '.join(map(str, counts))})\n")
            out.append("| method | budget | kept / head | " + " | ".join(families) + " | mean over tasks |")
            out.append("|---|---|---|" + "---|" * (len(families) + 1))
            for lab in _order({k[2] for k in keys}):
                for budget in sorted({k[3] for k in keys if k[2] == lab}):
                    entry = summary[(model, protocol, lab, budget)]
                    cells = [_cell(*entry["families"][f][:3]) if f in entry["families"] else "–" for f in families]
                    shown = "full" if is_full(lab) else f"{budget * 100:g}%"
                    out.append(f"| {lab} | {shown} | {entry['kept']:.0f} | " + " | ".join(cells)
                               + f" | **{_cell(*entry['mean'])}** |")
            out.append("")
    return "\n".join(out)


def plot_tasks(summary: dict[tuple, dict[str, Any]], model: str, path: Path) -> bool:
    """Mean accuracy over tasks vs budget, one panel per protocol; False when the model has no task rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keepkv.eval.report import _order, is_full, is_peer

    protocols = [p for p in PROTOCOL_TITLES if any(k[0] == model and k[1] == p for k in summary)]
    if not protocols:
        return False
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, protocol in zip(axes[0], protocols):
        keys = [k for k in summary if k[0] == model and k[1] == protocol]
        for i, lab in enumerate(_order({k[2] for k in keys})):
            points = sorted((k[3], summary[k]["mean"]) for k in keys if k[2] == lab)
            # --- peer engines (tools/peers): full in grey, presses dash-dot ---
            if is_full(lab):
                ax.axhline(points[0][1][0], color="grey" if is_peer(lab) else "black", linestyle="--", linewidth=1,
                           label=lab)
                continue
            style = "-." if is_peer(lab) else "-" if "keepkv" in lab else ":"
            # --- end peer engines ---
            xs = [b * 100 for b, _ in points]
            ys = [m[0] for _, m in points]
            errors = [[m[0] - m[1] for _, m in points], [m[2] - m[0] for _, m in points]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", markersize=3, capsize=3, color=cmap(i % 10), label=lab,
                        linestyle=style)
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20, 50])
        ax.set_xticklabels(["5", "10", "20", "50"])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("budget (% of context)")
        ax.set_ylabel("mean accuracy over task families")
        ax.set_title(PANEL_TITLES[protocol])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{model}: RULER-style tasks (95% stratified bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def tasks_section(rows: list[dict[str, Any]], results: Path) -> tuple[list[str], list[str]]:
    """``(Markdown lines, PNG names written into results)``; empty when there are no task rows."""
    from keepkv.eval.report import _slug
    from keepkv.eval.targets import targets_section

    summary = summarise(rows)
    if not summary:
        return [], []
    images = []
    for model in sorted({k[0] for k in summary}):
        name = f"tasks_{_slug(model)}.png"
        if plot_tasks(summary, model, results / name):
            images.append(name)
    lines = ["## RULER-style tasks (`keepkv eval tasks`)", "",
             "Accuracy per task family (string match: fraction of the reference values in the answer; QA: SQuAD F1) "
             "and the mean over families with a stratified bootstrap interval. `kept / head`: entries per KV head "
             "actually kept after compressing the context. `<press> [kvpress]`: NVIDIA kvpress's press run in its own "
             "environment on the same exported samples and token ids (`tools/peers/README.md`), scored by the same "
             "code; `full [kvpress]` is its uncompressed cache.", "", tables(summary), "", *targets_section(rows)]
    return lines, images

