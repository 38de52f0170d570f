"""float32 against bfloat16 on a CPU without AVX-512 BF16 or AMX: keepkv's full-cache engine (``load()``'s
default, compiled decode), one process, the two dtypes alternating, medians of ``--runs``; then one bfloat16
request (prefill and decode) under ``torch.profiler`` by op (self CPU).

    OMP_NUM_THREADS=2 .venv/bin/python results/bench/amd_epyc_2026-12-07/dtype_probe.py \\
        --model SmolLM2-135M-Instruct --prompt-tokens 2048 --new-tokens 32 --runs 3
"""

import argparse
import statistics
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from bench_common import machine_facts  # noqa: E402
from bench_peers import prompt_ids  # noqa: E402
from bench_request import keepkv_request  # noqa: E402

from keepkv.models import load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    print(machine_facts(), flush=True)
    models = {dtype: load(args.model, dtype=dtype) for dtype in ("float32", "bfloat16")}
    ids = prompt_ids(models["float32"].tokenizer, args.prompt_tokens)

    def request(model) -> tuple[float, float]:
        """(prefill seconds, seconds per decode step) of one greedy request (``bench_request.keepkv_request``)."""
        stamps = keepkv_request(model, ids, args.new_tokens)["token_seconds"]
        return stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    for model in models.values():  # warm-up: compiles the decode step
        request(model)
    results = {dtype: [] for dtype in models}
    for round_index in range(args.runs):
        for dtype, model in models.items():
            results[dtype].append(request(model))
            print(f"round {round_index} {dtype}: prefill {results[dtype][-1][0]:.2f} s, "
                  f"decode {1000 * results[dtype][-1][1]:.1f} ms/token", flush=True)
    medians = {dtype: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
               for dtype, rs in results.items()}
    for dtype, (prefill, step) in medians.items():
        print(f"median {dtype}: prefill {prefill:.2f} s, decode {1000 * step:.1f} ms/token")
    print(f"bfloat16 / float32: prefill {medians['bfloat16'][0] / medians['float32'][0]:.2f}x, "
          f"decode {medians['bfloat16'][1] / medians['float32'][1]:.2f}x (time; > 1 = bfloat16 slower)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        request(models["bfloat16"])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
