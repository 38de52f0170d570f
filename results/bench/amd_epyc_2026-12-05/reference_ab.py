"""A/B on this machine: KeepKV's decode with reference="last" (the new default) vs "ema", same process,
alternating, 2 rounds, beside the full cache (the 10% / full ratio of the issue-5 targets, side by side)."""
import json
import keepkv.cache.methods as methods
from keepkv.bench import load_network, run_point
orig = methods.make_method
out = []
for dtype, context in (("float32", 8192), ("bfloat16", 16384)):
    network, _ = load_network("SmolLM2-135M-Instruct", dtype, context)
    for rnd in range(2):
        for reference in ("last", "ema", "full"):
            budget = 1.0 if reference == "full" else 0.1
            methods.make_method = (orig if reference == "full" else
                                   lambda name, ref=reference, **kw: orig(name, **({"reference": ref} | kw) if name == "keepkv" else kw))
            p = run_point(network, context, None if reference == "full" else 0.1, runs=5)
            row = dict(dtype=dtype, context=context, budget=budget, reference=reference, round=rnd,
                       tokens_per_second=p["tokens_per_second"],
                       compression_ms=1000 * p.get("compression_seconds_median", 0.0),
                       step_ms=1000 * p.get("median_step_seconds_without_compression", p["median_step_seconds"]),
                       new_graphs=p["new_graphs_during_timed_runs"])
            print(json.dumps(row), flush=True)
            out.append(row)
    methods.make_method = orig
json.dump(out, open("reference_ab.json", "w"), indent=1)
