"""bf16 decode on this machine: RuntimeOptions' default decode kernel choice (auto: SDPA up to 4096 16-bit slots)
against the packed kernel everywhere (sdpa_decode_max_slots=0), one process, alternating."""
import dataclasses, json
from keepkv.bench import load_network, run_point
out = []
network, _ = load_network("SmolLM2-135M-Instruct", "bfloat16", 16384)
auto = network.runtime
for rnd in range(2):
    for name, rt in (("auto", auto), ("packed", dataclasses.replace(auto, sdpa_decode_max_slots=0))):
        network.runtime = rt
        for budget in (0.1, 0.2):
            p = run_point(network, 16384, budget, runs=5)
            row = dict(kernel=name, round=rnd, dtype="bfloat16", context=16384, budget=budget,
                       tokens_per_second=p["tokens_per_second"],
                       step_ms=1000 * p["median_step_seconds_without_compression"], new_graphs=p["new_graphs_during_timed_runs"])
            print(json.dumps(row), flush=True)
            out.append(row)
json.dump(out, open("decode_kernel_ab.json", "w"), indent=1)
