"""The committed code's default decode kernel on this machine: SmolLM2 bf16 at 16k, full / 10% / 20%."""
import json
from keepkv.bench import load_network, run_point
from keepkv.ops.attention import CPU_HAS_AMX
network, _ = load_network("SmolLM2-135M-Instruct", "bfloat16", 16384)
print("CPU_HAS_AMX", CPU_HAS_AMX)
for budget in (None, 0.1, 0.2):
    p = run_point(network, 16384, budget, runs=5)
    print(json.dumps(dict(budget=budget, tokens_per_second=round(p["tokens_per_second"], 2), new_graphs=p["new_graphs_during_timed_runs"])), flush=True)
