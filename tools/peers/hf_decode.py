"""Decode throughput of Hugging Face ``transformers`` ``generate()`` on a GGUF model (runs INSIDE the
transformers peer venv, ``.cache/peers/transformers``; imports only transformers, torch and the stdlib).

One run = greedy ``model.generate(input_ids, max_new_tokens=N)`` on the prompt ids written by keepkv's side (so
both engines see identical tokens), with end-of-sequence disabled so exactly ``N`` tokens are produced. A logits
processor stamps the wall clock each time generate() has new logits:

- ``prefill_seconds`` = first stamp - start (the prompt's forward pass);
- ``decode_tokens_per_second`` = ``(N - 2) / (t[N-1] - t[1])`` — steady-state decode steps per second, the first
  decode step excluded exactly as keepkv's ``GenerationStats`` excludes it (there it holds the compile).

Modes:

    python hf_decode.py --gguf M.gguf --prompt-ids ids.json --dtype float32 --dtype bfloat16 --runs 5
        -> warmup + ``--runs`` runs per dtype, prints one JSON object with per-run numbers and medians;
    python hf_decode.py --gguf M.gguf --prompt-ids ids.json --dtype float32 --serve
        -> loads once, prints ``{"ready": ...}``, then answers each stdin line ``{"cmd": "run", "dtype": ...,
           "new_tokens": N}`` with one JSON line (``{"cmd": "quit"}`` ends). ``tools/bench_peers.py`` drives this
           mode so keepkv and transformers runs can be interleaved in one benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time

from peer_common import DTYPES, emit, load_gguf, median, read_prompt_ids, serve_requests, versions


class _Stamps:
    """A logits processor that records ``time.perf_counter()`` at every generation step and changes nothing."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def one_run(model, input_ids, new_tokens: int) -> dict:
    """Greedy generate() of exactly ``new_tokens`` tokens; prefill seconds and steady decode tokens/s."""
    import torch
    from transformers import LogitsProcessorList

    if new_tokens < 3:
        raise SystemExit(f"new_tokens must be >= 3 (the first decode step is excluded), got {new_tokens}")
    stamps = _Stamps()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=None, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True,
            logits_processor=LogitsProcessorList([stamps]),
        )
    total = time.perf_counter() - started
    produced = out.shape[1] - input_ids.shape[1]
    t = stamps.times
    if produced != new_tokens or len(t) != new_tokens:
        raise SystemExit(f"generate() produced {produced} tokens with {len(t)} steps, expected {new_tokens}")
    return {
        "prompt_tokens": int(input_ids.shape[1]), "new_tokens": produced,
        "prefill_seconds": t[0] - started, "first_step_seconds": t[1] - t[0],
        "decode_seconds": t[-1] - t[1], "decode_steps": new_tokens - 2,
        "decode_tokens_per_second": (new_tokens - 2) / (t[-1] - t[1]),
        "total_seconds": total, "tokens": out[0, input_ids.shape[1]:].tolist(),
        "token_seconds": [stamp - started for stamp in t],  # when each new token's logits were ready
    }


def summarize(runs: list[dict]) -> dict:
    return {
        "runs": len(runs),
        "decode_tokens_per_second": median([r["decode_tokens_per_second"] for r in runs]),
        "prefill_seconds": median([r["prefill_seconds"] for r in runs]),
        "decode_tokens_per_second_all": [r["decode_tokens_per_second"] for r in runs],
        "prefill_seconds_all": [r["prefill_seconds"] for r in runs],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, help="GGUF file (the same one keepkv loads)")
    p.add_argument("--prompt-ids", required=True, help='JSON file {"input_ids": [...]} written by keepkv\'s side')
    p.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable; default float32 and bfloat16")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (>= 3)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per dtype (median reported; >= 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per dtype first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--serve", action="store_true", help="load once, answer JSON-line requests on stdin")
    args = p.parse_args(argv)
    args.dtype = args.dtype or list(DTYPES)
    if args.runs < 1 or args.new_tokens < 3 or args.threads < 1 or args.warmup < 0:
        p.error("need --runs >= 1, --new-tokens >= 3, --threads >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ids = read_prompt_ids(args.prompt_ids)
    input_ids = torch.tensor([ids], dtype=torch.long)
    models = {}
    for dtype in args.dtype:
        started = time.perf_counter()
        models[dtype] = load_gguf(args.gguf, dtype)
        print(f"[hf_decode] loaded {args.gguf} as {dtype} in {time.perf_counter() - started:.1f}s",
              file=sys.stderr, flush=True)
    info = {"engine": "transformers", "gguf": args.gguf, "prompt_tokens": len(ids), "threads": args.threads,
            "attn_implementation": next(iter(models.values())).config._attn_implementation, **versions()}
    if args.serve:
        def handle(request: dict) -> dict:
            dtype = request.get("dtype", args.dtype[0])
            if dtype not in models:
                return {"error": f"dtype {dtype!r} not loaded; loaded: {sorted(models)}"}
            return one_run(models[dtype], input_ids, int(request.get("new_tokens", args.new_tokens)))

        return serve_requests(info, handle)
    result = {**info, "new_tokens": args.new_tokens, "by_dtype": {}}
    for dtype, model in models.items():
        for _ in range(args.warmup):
            one_run(model, input_ids, args.new_tokens)
        runs = [one_run(model, input_ids, args.new_tokens) for _ in range(args.runs)]
        result["by_dtype"][dtype] = {**summarize(runs), "tokens": runs[-1]["tokens"]}
        print(f"[hf_decode] {dtype}: {result['by_dtype'][dtype]['decode_tokens_per_second']:.2f} tok/s decode, "
              f"prefill {result['by_dtype'][dtype]['prefill_seconds']:.2f}s", file=sys.stderr, flush=True)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
