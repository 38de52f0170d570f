"""Score kvpress's raw answers with keepkv's own scorers (runs in keepkv's venv, NOT in the kvpress venv).

``tools/peers/kvpress_eval.py eval`` writes one raw line per cell x press x budget (the answer text, the reference
answers, what the cache kept). This script scores each answer with exactly the functions keepkv's eval uses —
:func:`keepkv.eval.niah.score_niah` (``niah_exact_match``: the needle's number appears in the answer) and
:func:`keepkv.eval.qa.score_qa` (``qa_f1`` / ``qa_exact_match``, SQuAD-normalised, on the answer's first
paragraph) — and writes one row per metric in keepkv's result-row shape (``keepkv/eval/results.py``):

    {"task", "metric", "value", "model", "method", "variant", "budget", "kept_entries_per_head", "cell", "seed",
     "engine": "kvpress", "keepkv_version" (of the scorer), "kvpress_version", "transformers_version",
     "torch_version", "answer", ...}

    /tmp/venv/bin/python tools/peers/score_kvpress.py results/eval/peers/kvpress-SmolLM2-135M-Instruct.answers.jsonl
        -> results/eval/peers/kvpress-SmolLM2-135M-Instruct.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from keepkv import __version__ as keepkv_version
from keepkv.eval.niah import score_niah
from keepkv.eval.qa import score_qa

SCORERS = {"niah": score_niah, "qa": score_qa}
COPIED = ("task", "model", "method", "variant", "budget", "cell", "seed", "kvpress_version",
          "transformers_version", "torch_version", "dtype", "depth", "target_tokens", "context_tokens", "answer")


def score_rows(raw: list[dict]) -> list[dict]:
    """One keepkv-shaped row per (raw answer, metric)."""
    rows = []
    for item in raw:
        scorer = SCORERS.get(item["task"])
        if scorer is None:
            raise SystemExit(f"no scorer for task {item['task']!r}; known: {sorted(SCORERS)}")
        for metric, value in scorer(item["answer"], SimpleNamespace(answers=list(item["answers"]))).items():
            rows.append({**{k: item.get(k) for k in COPIED}, "metric": metric, "value": float(value),
                         "engine": "kvpress", "keepkv_version": keepkv_version,  # the version that scored it
                         "kept_entries_per_head": item.get("kept_entries_mean"),
                         "context_tokens_peer": item.get("context_tokens_peer")})
    return rows


def summary_table(rows: list[dict]) -> str:
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["metric"], row["method"], row["budget"])].append(row["value"])
    lines = [f"{'metric':18s} {'method':18s} {'budget':>6s} {'mean':>6s} {'n':>4s}"]
    for (metric, method, budget), values in sorted(groups.items()):
        lines.append(f"{metric:18s} {method:18s} {budget:6.2f} {sum(values) / len(values):6.3f} {len(values):4d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("answers", nargs="+", help="raw answers JSONL from kvpress_eval.py eval (*.answers.jsonl)")
    p.add_argument("--out", help="scored rows JSONL (default: the first answers path without .answers)")
    args = p.parse_args(argv)
    raw = [json.loads(line) for path in args.answers for line in Path(path).read_text().splitlines() if line.strip()]
    rows = score_rows(raw)
    first = Path(args.answers[0])
    out = Path(args.out) if args.out else first.with_name(first.name.replace(".answers.jsonl", ".jsonl"))
    if any(out == Path(a) for a in args.answers):
        raise SystemExit("--out would overwrite the raw answers; give another path")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(summary_table(rows))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
