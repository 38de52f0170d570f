"""A/B on this machine: KeepKV's decode with kernel_size=7 (the new default) vs 1, same process, alternating."""
import json, sys
import keepkv.cache.methods as methods
from keepkv.bench import load_network, run_point
orig = methods.make_method
out = []
for dtype, context in (("float32", 8192), ("bfloat16", 16384)):
    network, _ = load_network("SmolLM2-135M-Instruct", dtype, context)
    for rnd in range(2):
        for k in (7, 1):
            methods.make_method = lambda name, **kw: orig(name, **({"kernel_size": k} | kw) if name == "keepkv" else kw)
            p = run_point(network, context, 0.1, runs=5)
            row = dict(dtype=dtype, context=context, budget=0.1, kernel_size=k, round=rnd,
                       tokens_per_second=p["tokens_per_second"], compression_ms=1000 * p["compression_seconds_median"],
                       step_ms=1000 * p["median_step_seconds_without_compression"], new_graphs=p["new_graphs_during_timed_runs"])
            print(json.dumps(row), flush=True)
            out.append(row)
    methods.make_method = orig
json.dump(out, open("kernel_size_ab.json", "w"), indent=1)
