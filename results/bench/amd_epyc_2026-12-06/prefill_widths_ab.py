"""Full-cache prefill: the forward widths before 2026-12-06 (``old``: long chunks first, the rest in 512-token
chunks) against the remainder first (``new2048``, the default since) and 4096-token long chunks (``new4096``), in
one process, interleaved, ``ROUNDS`` rounds after one warm-up prefill each; prints the widths, the logits' largest
difference against ``old`` and the medians.

    python results/bench/amd_epyc_2026-12-06/prefill_widths_ab.py MODEL DTYPE PROMPT_TOKENS ROUNDS [VARIANTS]

Since 2026-12-07 the full cache's long chunk is ``prefill_uncompressed_long_chunk`` (section 22); the variants
set it (before, they set ``prefill_long_chunk``, which then bounded the full cache too: the same widths).

``VARIANTS``: a comma-separated subset (e.g. ``new2048,new4096``); the first is the one the others are compared with.

The run logged in ``prefill_widths_ab.txt`` had one more knob in ``new4096``: the MLP in row blocks of at most
32 MiB (a ``RuntimeOptions.mlp_block_bytes`` option tried and not kept, ``docs/profile.md`` section 16), and
``old`` had it off; without it ``new4096`` is the plain 4096-token chunk.
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
