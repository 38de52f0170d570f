"""keepkv's full-cache prefill with the MLP before 2026-12-07 (``plain``: fresh ``gate(x)``, ``up(x)``,
``silu`` and product tensors in every layer of every chunk) against the MLP in the prefill's scratch buffers
(``workspace``: ``keepkv.ops.workspace``), in one process, interleaved; per prefill the wall time and the process's
minor page faults (``getrusage``); the largest logit difference against the first prefill. Two phases: glibc
``malloc`` as it comes, then with ``M_TRIM_THRESHOLD`` raised to 1 GiB (``mallopt``: freed memory is kept, so
nothing faults), which shows what the faults cost.

    python results/bench/intel_xeon_2026-12-07/prefill_workspace_ab.py MODEL DTYPE PROMPT_TOKENS [ROUNDS]

Run on the code of 2026-12-07 before ``prefill_uncompressed_long_chunk`` (2048-token chunks); on later code the
chunks are as wide as the default gives.
"""

import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import keepkv.models.transformer as tr  # noqa: E402
from bench_peers import prompt_ids  # noqa: E402
from keepkv.models import load  # noqa: E402

name, dtype, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
torch.set_num_threads(2)


def plain(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


variants = {"plain": plain, "workspace": tr.MLP.forward}
engine = (lm := load(name, dtype=dtype)).engine
ids = prompt_ids(lm.tokenizer, ctx)
input_ids = torch.tensor([ids])
valid = torch.ones_like(input_ids, dtype=torch.bool)


def prefill():
    engine.prepare_caches(1, len(ids), 1)
    with torch.inference_mode():
        out, _ = engine.prefill(input_ids, valid)
        engine.end_prefill()
    return out.float()


reference = None
for phase in ("default-malloc", "trim-1GiB"):
    if phase == "trim-1GiB":
        ctypes.CDLL("libc.so.6").mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    seconds = {k: [] for k in variants}
    faults = {k: [] for k in variants}
    for round_index in range(rounds + 1):  # round 0: warm-up
        for key, forward in variants.items():
            tr.MLP.forward = forward
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            out = prefill()
            elapsed = time.perf_counter() - started
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            reference = out if reference is None else reference
            print(phase, round_index, key, round(elapsed, 3), "s", faulted, "faults, max |logit diff|",
                  (out - reference).abs().max().item(), flush=True)
            if round_index:
                seconds[key].append(elapsed)
                faults[key].append(faulted)
    for key in variants:
        print("SUMMARY", phase, key, "median", round(statistics.median(seconds[key]), 3),
              [round(s, 3) for s in seconds[key]], "minor faults", faults[key], flush=True)
