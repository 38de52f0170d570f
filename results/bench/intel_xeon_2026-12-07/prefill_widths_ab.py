"""Full-cache prefill: long chunks of 2048 tokens (``new2048``, the default before 2026-12-07) against 4096
(``new4096``: ``RuntimeOptions.prefill_uncompressed_long_chunk``, the default since), in one process, interleaved,
``ROUNDS`` rounds after one warm-up prefill each; prints the widths, the logits' largest difference and the
medians. A copy of ``results/bench/amd_epyc_2026-12-06/prefill_widths_ab.py`` with the new option set.

    python results/bench/intel_xeon_2026-12-07/prefill_widths_ab.py MODEL DTYPE PROMPT_TOKENS ROUNDS new2048,new4096
"""

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

import keepkv.generate as G
import torch
from bench_peers import prompt_ids
from keepkv.models import load
from keepkv.runtime import RuntimeOptions

name, dtype, ctx, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
new_widths = G.GenerationEngine.prefill_widths


def old_widths(self, valid):
    return G.chunk_widths(valid.shape[1], self.prefill_chunk_size, self.long_chunk(valid))


V = {"old": (RuntimeOptions(prefill_long_chunk=2048, prefill_uncompressed_long_chunk=2048), old_widths),
     "new2048": (RuntimeOptions(prefill_long_chunk=2048, prefill_uncompressed_long_chunk=2048), new_widths),
     "new4096": (RuntimeOptions(prefill_long_chunk=2048, prefill_uncompressed_long_chunk=4096), new_widths)}
if len(sys.argv) > 5:
    V = {k: V[k] for k in sys.argv[5].split(",")}
base = next(iter(V))
models = {k: load(name, dtype=dtype, runtime=r) for k, (r, _) in V.items()}
ids = prompt_ids(models[base].tokenizer, ctx)
input_ids = torch.tensor([ids])
valid = torch.ones_like(input_ids, dtype=torch.bool)


def prefill(k):
    G.GenerationEngine.prefill_widths = V[k][1]
    engine = models[k].engine
    engine.prepare_caches(1, len(ids), 1)
    with torch.inference_mode():
        out, _ = engine.prefill(input_ids, valid)
        engine.end_prefill()
    return out.float()


outs = {k: prefill(k) for k in V}
print(name, dtype, ctx, {k: (V[k][1](models[k].engine, valid)) for k in V})
print(f"max |logit diff| vs {base}", {k: (outs[k] - outs[base]).abs().max().item() for k in V},
      "max |logit|", outs[base].abs().max().item(), flush=True)
res = {k: [] for k in V}
for _ in range(rounds):
    for k in V:
        started = time.perf_counter()
        prefill(k)
        res[k].append(time.perf_counter() - started)
for k in V:
    print(k, "median", round(statistics.median(res[k]), 3), [round(x, 3) for x in res[k]], flush=True)
print(f"ratios {base}/variant per round",
      {k: [round(a / b, 3) for a, b in zip(res[base], res[k])] for k in V if k != base})
