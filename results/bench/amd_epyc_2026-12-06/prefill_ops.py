"""One full-cache prefill by op: two warm-ups, three timed runs, then ``torch.profiler`` by op and by input shape
(``PREFILL_OPS_QUICK=1``: one warm-up and the profiled run only, for long prompts).

    python prefill_ops.py keepkv MODEL DTYPE PROMPT_TOKENS   # .venv: keepkv's default engine; writes the prompt ids
    python prefill_ops.py transformers GGUF DTYPE            # .cache/peers/transformers: one forward on those ids

The transformers side reads the ids the keepkv side wrote (``.cache/prefill_ops_ids.json``), so both see the same
tokens; it imports only transformers (through ``tools/peers/peer_common.py``), torch and the stdlib.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[3]
IDS = ROOT / ".cache" / "prefill_ops_ids.json"


def time_and_profile(label: str, prefill) -> None:
    quick = os.environ.get("PREFILL_OPS_QUICK") == "1"
    for _ in range(1 if quick else 2):
        prefill()
    seconds = []
    for _ in range(0 if quick else 3):
        started = time.perf_counter()
        prefill()
        seconds.append(time.perf_counter() - started)
    if seconds:
        print(label, "prefill", [round(x, 3) for x in seconds], "median", statistics.median(seconds), flush=True)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        prefill()
    print(label, "profiled prefill", round(time.perf_counter() - started, 3), "s", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))


def keepkv_side(name: str, dtype: str, context: int) -> None:
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
    from bench_peers import prompt_ids, write_prompt_file
    from keepkv.models import load

    engine = (lm := load(name, dtype=dtype)).engine
    ids = prompt_ids(lm.tokenizer, context)
    write_prompt_file(IDS, ids)
    input_ids = torch.tensor([ids])
    valid = torch.ones_like(input_ids, dtype=torch.bool)

    def prefill():
        engine.prepare_caches(1, len(ids), 1)
        with torch.inference_mode():
            engine.prefill(input_ids, valid)
            engine.end_prefill()

    time_and_profile("keepkv", prefill)


def transformers_side(gguf: str, dtype: str) -> None:
    sys.path.insert(0, str(ROOT / "tools" / "peers"))
    from peer_common import load_gguf, read_prompt_ids

    torch.set_num_threads(2)
    model = load_gguf(gguf, dtype)
    ids = torch.tensor([read_prompt_ids(str(IDS))])

    def prefill():
        with torch.inference_mode():
            model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=True)

    time_and_profile("hf", prefill)


if __name__ == "__main__":
    if sys.argv[1:2] == ["keepkv"]:
        keepkv_side(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["transformers"]:
        transformers_side(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
