"""A/B in one process: the compiled decode step with inductor's Python wrapper against its C++ wrapper
(options={"cpp_wrapper": True}); 3 rounds alternating, JSON lines on stdout. Pass --flat (required for the C++
wrapper in torch 2.13: it cannot generate nested compile regions), which compiles both without them.

    python wrapper_ab.py Qwen2.5-Coder-0.5B-Instruct 4096 bfloat16 0.1 --flat
"""
import json
import sys
import time

import torch

if "--flat" in sys.argv:
    sys.argv.remove("--flat")
    torch.compiler.nested_compile_region = lambda fn: fn  # before keepkv's modules mark their regions

from keepkv.bench import DECODE_SLACK, fill_synthetic, time_decode  # noqa: E402
from keepkv.models import load  # noqa: E402

model_name, context, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
budget = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "full" else None
models = {}
for wrapper in ("python", "cpp"):
    model = load(model_name, dtype=dtype, **({} if budget is None else {"kv_budget": budget}))
    if wrapper == "cpp":
        engine = model.engine
        engine._decode_compiled = torch.compile(engine._decode, fullgraph=True, dynamic=False,
                                                options={"cpp_wrapper": True})
    models[wrapper] = model
compressed = budget is not None
steps = (DECODE_SLACK + 6 if compressed else 8) + 2 * (DECODE_SLACK if compressed else 16) + 8
for round_ in range(3):
    for wrapper, model in models.items():
        fill_synthetic(model.engine, context, steps)
        start = time.time()
        result = time_decode(model.engine, context, 2, compressed)
        step = result.get("median_step_seconds_without_compression", result["median_step_seconds"])
        print(json.dumps({"wrapper": wrapper, "round": round_, "step_ms": 1e3 * step,
                          "tok_s": result["tokens_per_second"], "new_graphs": result["new_graphs_during_timed_runs"],
                          "wall": time.time() - start}), flush=True)
