"""The decode step of load()'s compiled engine under torch.profiler with inductor's kernel profile on (so each
generated C++ kernel shows by name): synthetic context (keepkv.bench), 2 timed runs then 1 profiled run of 64 steps.

    python decode_profile.py Qwen2.5-Coder-0.5B-Instruct 4096 bfloat16 0.1 > decode_profile_....txt
"""
import sys

import torch
import torch._inductor.config as inductor_config

from keepkv.bench import DECODE_SLACK, fill_synthetic, time_decode
from keepkv.models import load

inductor_config.cpp.enable_kernel_profile = True
model_name, context, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
budget = float(sys.argv[4]) if len(sys.argv) > 4 else None
model = load(model_name, dtype=dtype, **({} if budget is None else {"kv_budget": budget}))
compressed = budget is not None
steps = (DECODE_SLACK + 6 if compressed else 8) + 2 * (DECODE_SLACK if compressed else 16) + 8
fill_synthetic(model.engine, context, steps)
print(time_decode(model.engine, context, 2, compressed))
fill_synthetic(model.engine, context, steps)
with torch.profiler.profile() as profile:
    print(time_decode(model.engine, context, 1, compressed))
print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
