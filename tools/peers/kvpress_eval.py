"""NVIDIA kvpress as keepkv's peer (runs INSIDE the kvpress venv, ``.cache/peers/kvpress``; imports kvpress,
transformers, torch and the stdlib — never keepkv).

Two modes.

``eval``: the cells keepkv's evaluation exported (``keepkv eval niah|qa ... --export-prompts FILE.jsonl``, one JSON
line per cell: ``{"task", "cell", "context", "question", "answers", "context_tokens", "depth", "max_new_tokens",
"chat"}``) run through kvpress's pipeline ``pipeline("kv-press-text-generation")``: the context is prefilled under
the press (compressed before the question is read: query-agnostic), then the question is fed and the answer
decoded greedily (``max_new_tokens`` of the cell). Each press runs at ``compression_ratio = 1 - budget``. With
``"chat": true`` the pipeline's own preprocessing applies the chat template (context and question inside one user
turn, split at the context's end); with ``"chat": false`` the context and question ids are the plain tokenizations
(the pipeline's internal ``_forward`` is called, since its preprocessing always applies a template). Optional
``"context_ids"`` / ``"question_ids"`` fields in a cell override the tokenization (keepkv's exact tokens).

RULER-style task exports (``keepkv eval export-tasks``, ids added by ``tools/peers/task_prompts.py``) run the
same way, in one or both protocols (``--protocol``, :func:`protocol_split`): ``agnostic`` = kvpress's setting as
is (the context compressed, then the question + assistant turn + answer prefix fed); ``aware`` = keepkv's
query-aware protocol (everything but the prompt's last token, question included, prefilled and compressed, then
that last token fed). ``--shared-prefill`` computes one uncompressed prefill per cell and protocol and replays it
through each press's own hook (:class:`SharedPrefill`: the same caches as the pipeline, bit for bit; about 10x
faster with 7 presses x 2 budgets); ``--check-shared`` also runs the plain pipeline per row and stops on any
difference. A cell's ``decode_max_new_tokens`` (written by ``task_prompts.py``: what keepkv's batch let the answer
take) overrides its ``max_new_tokens`` (:func:`decode_allowance`), and its ``stop_token_ids`` (keepkv's end tokens)
replace the model's ``generation_config.eos_token_id`` for its answer (:func:`stop_tokens`), so both engines decode
under the same limits.

This script writes RAW answers (``--out``, one JSON line per cell x press x budget, with what the cache actually
kept); scoring is done on keepkv's side by ``tools/peers/score_kvpress.py`` with keepkv's own metrics, so the two
engines are scored by the same code.

``bench``: decode throughput of kvpress at one compression ratio on prompt ids written by keepkv's side
(``{"input_ids": [...]}``): prefill ``ids[:-1]`` under the press, feed the last prompt token, then decode greedily
with the same model calls as the pipeline's ``generate_answer`` (end-of-sequence ignored). ``decode_tokens_per_second
= (N - 2) / (t[N-1] - t[1])`` (first decode step excluded, as keepkv does). ``--serve`` answers JSON-line requests
(``{"cmd": "run", "dtype": ..., "press": ..., "compression_ratio": ..., "new_tokens": N}``) so that
``tools/bench_peers.py`` can interleave kvpress and keepkv runs.

Presses (method name -> kvpress class, kvpress 0.5.5): snapkv SnapKVPress, streamingllm StreamingLLMPress, tova
TOVAPress, knorm KnormPress, expectedattention ExpectedAttentionPress, criticalkv CriticalKVPress(SnapKVPress),
adakv-snapkv AdaKVPress(SnapKVPress); budget 1.0 is one uncompressed ``full`` row per cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peer_common import (
    DTYPES,
    emit,
    load_gguf,
    load_gguf_tokenizer,
    median,
    read_prompt_ids,
    serve_requests,
    versions,
)

PRESS_NAMES = ("snapkv", "streamingllm", "tova", "knorm", "expectedattention", "criticalkv", "adakv-snapkv")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
CELL_KEYS = ("task", "cell", "context", "question", "answers", "max_new_tokens", "chat")
PROTOCOLS = ("agnostic", "aware")
TASK_KEYS = ("length", "sample", "seed", "haystack", "answer_prefix", "keepkv_group")  # copied from task records into raw rows


def make_press(name: str, compression_ratio: float):
    """The kvpress press called ``name`` at ``compression_ratio`` (fraction of the context REMOVED)."""
    if not 0.0 <= compression_ratio < 1.0:
        raise SystemExit(f"compression_ratio must be in [0, 1), got {compression_ratio}")
    if name not in PRESS_NAMES:
        raise SystemExit(f"unknown press {name!r}; allowed: {', '.join(PRESS_NAMES)}")
    import kvpress as kp

    factories = {
        "snapkv": lambda r: kp.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: kp.StreamingLLMPress(compression_ratio=r),
        "tova": lambda r: kp.TOVAPress(compression_ratio=r),
        "knorm": lambda r: kp.KnormPress(compression_ratio=r),
        "expectedattention": lambda r: kp.ExpectedAttentionPress(compression_ratio=r),
        "criticalkv": lambda r: kp.CriticalKVPress(press=kp.SnapKVPress(compression_ratio=r)),
        "adakv-snapkv": lambda r: kp.AdaKVPress(press=kp.SnapKVPress(compression_ratio=r)),
    }
    if name not in factories:
        raise SystemExit(f"unknown press {name!r}; allowed: {', '.join(PRESS_NAMES)}")
    return factories[name](compression_ratio)


def press_variant(name: str) -> str:
    """``variant`` column: keepkv uses it for KeepKV's merge variant only, so every press has ``""`` (criticalkv
    and adakv-snapkv run on SnapKV scores, as keepkv's methods of the same names do)."""
    return ""


def read_cells(path: str | Path) -> list[dict]:
    """Cells of an exported prompts file; every line must carry :data:`CELL_KEYS`."""
    cells = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        cell = json.loads(line)
        missing = [k for k in CELL_KEYS if k not in cell]
        if missing:
            raise SystemExit(f"{path}:{number}: cell lacks {missing}; a cell needs {list(CELL_KEYS)}")
        cells.append(cell)
    if not cells:
        raise SystemExit(f"{path}: no cells")
    return cells


def kept_entries(cache) -> list[int]:
    """Entries per layer left in a DynamicCache (AdaKV masks instead of removing: it reports the full length)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def cell_ids(pipe, cell: dict, tokenizer) -> tuple[list[int], list[int], str]:
    """``(context ids, question ids, where they came from)`` of a cell, split at the end of the context: the cell's
    own ``context_ids`` / ``question_ids`` (keepkv's exact tokens: ``"keepkv"``), else the pipeline's own chat
    preprocessing (``"kvpress-template"``: context and question in one user turn, the assistant turn opened with
    the cell's ``answer_prefix``), else (``"chat": false``) the plain tokenizations (``"plain"``)."""
    if cell.get("context_ids") is not None:
        return list(cell["context_ids"]), list(cell["question_ids"]), "keepkv"
    if not cell["chat"]:
        return (tokenizer.encode(cell["context"], add_special_tokens=False),
                tokenizer.encode(cell["question"], add_special_tokens=False), "plain")
    inputs = pipe.preprocess(cell["context"], questions=[cell["question"]],
                             answer_prefix=cell.get("answer_prefix", ""), max_context_length=int(1e10))
    return inputs["context_ids"][0].tolist(), inputs["questions_ids"][0][0].tolist(), "kvpress-template"


def decode_allowance(cell: dict) -> int:
    """New tokens the cell's answer may take: ``decode_max_new_tokens`` (keepkv's batch allowance) when present,
    else the cell's ``max_new_tokens``."""
    value = cell.get("decode_max_new_tokens") or cell["max_new_tokens"]
    if int(value) < 1:
        raise SystemExit(f"{cell['cell']}: the decode allowance must be >= 1 token, got {value}")
    return int(value)


class stop_tokens:
    """Context manager: ``model.generation_config.eos_token_id`` (where the pipeline's ``generate_answer`` stops)
    set to the cell's ``stop_token_ids`` (keepkv's end tokens) while it answers; unchanged without them."""

    def __init__(self, model, cell: dict):
        self.config, self.ids = model.generation_config, cell.get("stop_token_ids")

    def __enter__(self):
        self.saved = self.config.eos_token_id
        if self.ids:
            self.config.eos_token_id = [int(t) for t in self.ids]
        return self

    def __exit__(self, *exc):
        self.config.eos_token_id = self.saved
        return False


def protocol_split(context_ids: list[int], question_ids: list[int], protocol: str) -> tuple[list[int], list[int]]:
    """``(ids prefilled under the press, ids fed after it)``. ``agnostic`` (kvpress's own setting): the context,
    then the question (with the assistant turn and answer prefix). ``aware`` (keepkv's query-aware protocol,
    ``keepkv.eval.prompted.compressed_part`` / ``fed_part``): everything but the prompt's last token is
    prefilled and compressed (the question included), then that last token is fed and the answer decoded."""
    if protocol == "agnostic":
        return context_ids, question_ids
    if protocol == "aware":
        return context_ids + question_ids[:-1], question_ids[-1:]
    raise SystemExit(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")


def answer_cell(pipe, cell: dict, press, tokenizer, protocol: str = "agnostic") -> tuple[str, list[int], int, str]:
    """``(answer, kept entries per layer after the compression, compressed tokens, ids source)`` for one cell and
    press: ``pipe._forward`` (the pipeline's prefill under the press, then its greedy ``generate_answer``) on the
    ids of :func:`cell_ids` split by :func:`protocol_split`. For the agnostic protocol without keepkv's ids this is
    exactly what ``pipe(context, question=..., answer_prefix=..., press=...)`` runs."""
    import torch
    from transformers import DynamicCache

    context_ids, question_ids, source = cell_ids(pipe, cell, tokenizer)
    prefilled, fed = protocol_split(context_ids, question_ids, protocol)
    cache = DynamicCache()
    inputs = {"context_ids": torch.tensor([prefilled]), "questions_ids": [torch.tensor([fed])]}
    with torch.inference_mode():
        with stop_tokens(pipe.model, cell):
            answer = pipe._forward(inputs, max_new_tokens=decode_allowance(cell), press=press, cache=cache)[0]
    return answer, kept_entries(cache), len(prefilled), source


class SharedPrefill:
    """One uncompressed prefill of ``ids`` whose per-layer attention-hook arguments are recorded, then replayed
    through any press's own ``forward_hook`` on a copy of the full cache (:meth:`compressed_cache`).

    Exact, not an approximation: during kvpress's prefill a press only rewrites the cache after each attention
    layer has computed its output from the full keys (``BasePress.forward_hook``), so every layer's input
    ``hidden_states``, ``cache_position`` and ``position_embeddings`` are the same under every press and without
    one. Replaying the hook with those recorded arguments on a copy of the uncompressed cache leaves the cache the
    pipeline would leave (checked by ``--check-shared``, which also runs the plain pipeline and compares). AdaKV's
    ``masked_key_indices`` (reset by kvpress's attention patch at every prefill) are reset before each replay."""

    def __init__(self, model, ids: list[int]):
        import torch
        from transformers import DynamicCache

        self.model, self.length = model, len(ids)
        self.calls: list[tuple] = []
        language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
        self.layers = [layer.self_attn for layer in language_model.layers]
        for attn in self.layers:  # as BasePress.__call__ does
            attn.rotary_emb = language_model.rotary_emb

        def record(module, args, kwargs, output):
            kept = {k: v for k, v in kwargs.items() if k != "past_key_values"}
            self.calls.append((module, args, kept, (None, output[1])))
            return output

        hooks = [attn.register_forward_hook(record, with_kwargs=True) for attn in self.layers]
        self.cache = DynamicCache()
        try:
            with torch.inference_mode():
                model.model(input_ids=torch.tensor([ids]), past_key_values=self.cache)
        finally:
            for hook in hooks:
                hook.remove()
        if len(self.calls) != len(self.layers):
            raise SystemExit(f"recorded {len(self.calls)} attention calls for {len(self.layers)} layers")

    def compressed_cache(self, press):
        """A copy of the full cache, compressed by ``press`` (None: the uncompressed copy)."""
        import copy

        import torch

        cache = copy.deepcopy(self.cache)
        if press is None:
            return cache
        for attn in self.layers:
            attn.masked_key_indices = None
        with torch.inference_mode(), press(self.model):  # post_init_from_model + hooks, as in the pipeline
            for module, args, kwargs, output in self.calls:
                press.forward_hook(module, list(args), {**kwargs, "past_key_values": cache}, output)
        return cache


def answer_shared(pipe, shared: SharedPrefill, fed: list[int], press, max_new_tokens: int) -> tuple[str, list[int]]:
    """The pipeline's ``generate_answer`` (greedy, positions after the uncompressed length) on the press's cache."""
    import torch

    cache = shared.compressed_cache(press)
    kept = kept_entries(cache)  # before the question and answer are appended
    with torch.inference_mode():
        answer = pipe.generate_answer(question_ids=torch.tensor([fed]), cache=cache, context_length=shared.length,
                                      max_new_tokens=max_new_tokens)
    return answer, kept


def template_ids_equal(pipe, cell: dict) -> bool | None:
    """Whether kvpress's own chat preprocessing gives the same ids as the cell's ``context_ids`` /
    ``question_ids`` (None without them or without a chat template): a check that both engines see one prompt."""
    if cell.get("context_ids") is None or not cell["chat"]:
        return None
    inputs = pipe.preprocess(cell["context"], questions=[cell["question"]],
                             answer_prefix=cell.get("answer_prefix", ""), max_context_length=int(1e10))
    return (inputs["context_ids"][0].tolist() == list(cell["context_ids"])
            and inputs["questions_ids"][0][0].tolist() == list(cell["question_ids"]))


def run_eval(args: argparse.Namespace) -> int:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import torch
    from tqdm import tqdm
    from transformers import pipeline

    cells = read_cells(args.prompts)
    if args.limit:
        cells = cells[: args.limit]
    tokenizer = load_gguf_tokenizer(args.gguf)
    model = load_gguf(args.gguf, args.dtype)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    meta = {"model": args.model, "engine": "kvpress", "dtype": args.dtype, **versions()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, set] = {}  # row key -> decode allowances it ran with (None: before they were recorded)
    if out.exists() and not args.overwrite:
        for line in out.read_text().splitlines():
            row = json.loads(line)
            key = (row["task"], row["cell"], row["method"], row["budget"], row.get("protocol", "agnostic"))
            done.setdefault(key, set()).add(row.get("max_new_tokens"))

    def finished(cell: dict, key: tuple) -> bool:
        # rows written before the allowance was recorded ran with the cell's own max_new_tokens
        ran = {int(cell["max_new_tokens"]) if a is None else int(a) for a in done.get(key, ())}
        return decode_allowance(cell) in ran

    # budget 1.0 is the uncompressed reference: one "full" row per cell, not one per press
    wanted = [(c, "full" if b >= 1.0 else p, b, protocol) for protocol in args.protocol for c in cells
              for b in args.budget for p in args.press]
    jobs = list({(c["task"], c["cell"], p, b, protocol): (c, p, b, protocol) for c, p, b, protocol in wanted
                 if not finished(c, (c["task"], c["cell"], p, b, protocol))}.values())
    print(f"[kvpress_eval] {len(cells)} cells x {len(args.press)} presses x {len(args.budget)} budgets x "
          f"{len(args.protocol)} protocols: {len(jobs)} to run ({len(done)} already in {out}); "
          f"{'one shared prefill per cell and protocol' if args.shared_prefill else 'one pipeline call per row'}",
          file=sys.stderr, flush=True)
    shared_key, shared, equal = None, None, {}
    with out.open("w" if args.overwrite else "a") as handle:
        for cell, name, budget, protocol in tqdm(jobs, desc="kvpress", file=sys.stderr):
            press = None if name == "full" else make_press(name, round(1.0 - budget, 6))
            started = time.perf_counter()
            if args.shared_prefill:
                context_ids, question_ids, source = cell_ids(pipe, cell, tokenizer)
                prefilled, fed = protocol_split(context_ids, question_ids, protocol)
                if shared_key != (cell["task"], cell["cell"], protocol):
                    shared_key, shared = (cell["task"], cell["cell"], protocol), None
                    shared = SharedPrefill(model, prefilled)
                with stop_tokens(model, cell):
                    answer, kept = answer_shared(pipe, shared, fed, press, decode_allowance(cell))
                compressed_tokens = len(prefilled)
                if args.check_shared:
                    reference = answer_cell(pipe, cell, make_press(name, round(1.0 - budget, 6)) if press else None,
                                            tokenizer, protocol)
                    if (reference[0], reference[1]) != (answer, kept):
                        raise SystemExit(f"shared prefill differs from the pipeline on {cell['cell']} {name} "
                                         f"{budget} {protocol}: {answer!r} {kept[:3]} vs {reference[0]!r} "
                                         f"{reference[1][:3]}")
            else:
                answer, kept, compressed_tokens, source = answer_cell(pipe, cell, press, tokenizer, protocol)
            if cell["cell"] not in equal:
                equal[cell["cell"]] = template_ids_equal(pipe, cell)
            row = {
                "task": cell["task"], "cell": cell["cell"], "method": name, "variant": press_variant(name),
                "budget": budget, "compression_ratio": round(1.0 - budget, 6), "seed": cell.get("seed", args.seed),
                "protocol": protocol, "answer": answer, "answers": cell["answers"],
                "context_tokens": cell.get("context_tokens"), "context_tokens_peer": compressed_tokens,
                "depth": cell.get("depth"), "target_tokens": cell.get("target_tokens"),
                "kept_entries_mean": sum(kept) / len(kept) if kept else None,
                "ids_source": source, "kvpress_template_ids_equal": equal[cell["cell"]],
                "shared_prefill": bool(args.shared_prefill), "max_new_tokens": decode_allowance(cell),
                "stop_token_ids": cell.get("stop_token_ids") or model.generation_config.eos_token_id,
                "seconds": time.perf_counter() - started, **meta,
            }
            for key in TASK_KEYS:  # keepkv's task records (keepkv eval export-tasks) carry these
                if key in cell:
                    row.setdefault(key, cell[key])
            handle.write(json.dumps(row) + "\n")
            handle.flush()
    return 0


# ---- decode throughput ---------------------------------------------------------------------------------------
def bench_run(model, ids: list[int], press_name: str | None, compression_ratio: float, new_tokens: int) -> dict:
    """Prefill ``ids[:-1]`` under the press, then the pipeline's greedy decode loop for ``new_tokens`` tokens."""
    import torch
    from transformers import DynamicCache

    if new_tokens < 3:
        raise SystemExit(f"new_tokens must be >= 3, got {new_tokens}")
    press = make_press(press_name, compression_ratio) if press_name and compression_ratio > 0 else None
    cache = DynamicCache()
    context = torch.tensor([ids[:-1]])
    stamps = []
    started = time.perf_counter()
    with torch.inference_mode():
        with press(model) if press is not None else _null():
            model.model(input_ids=context, past_key_values=cache)
        kept = kept_entries(cache)
        position = torch.tensor([[len(ids) - 1]])
        out = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=cache, position_ids=position,
                    logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        stamps.append(time.perf_counter())
        tokens = [int(token)]
        for i in range(new_tokens - 1):
            out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=position + 1 + i)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))  # host read, as the pipeline's stop check does
            stamps.append(time.perf_counter())
    return {
        "prompt_tokens": len(ids), "new_tokens": new_tokens, "press": press_name,
        "compression_ratio": compression_ratio, "kept_entries_mean": sum(kept) / len(kept),
        "prefill_seconds": stamps[0] - started, "first_step_seconds": stamps[1] - stamps[0],
        "decode_seconds": stamps[-1] - stamps[1], "decode_steps": new_tokens - 2,
        "decode_tokens_per_second": (new_tokens - 2) / (stamps[-1] - stamps[1]), "tokens": tokens,
        "total_seconds": stamps[-1] - started,
        "token_seconds": [stamp - started for stamp in stamps],  # when each new token was known
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_bench(args: argparse.Namespace) -> int:
    ids = read_prompt_ids(args.prompt_ids)
    model = load_gguf(args.gguf, args.dtype)
    ratio = args.compression_ratio
    info = {"engine": "kvpress", "gguf": args.gguf, "dtype": args.dtype, "prompt_tokens": len(ids),
            "attn_implementation": model.config._attn_implementation, **versions()}
    if args.serve:
        def handle(request: dict) -> dict:
            if request.get("dtype", args.dtype) != args.dtype:
                return {"error": f"this worker holds {args.dtype}"}
            return bench_run(model, ids, request.get("press", args.bench_press),
                             float(request.get("compression_ratio", ratio)), int(request.get("new_tokens", args.new_tokens)))

        return serve_requests(info, handle)
    for _ in range(args.warmup):
        bench_run(model, ids, args.bench_press, ratio, args.new_tokens)
    runs = [bench_run(model, ids, args.bench_press, ratio, args.new_tokens) for _ in range(args.runs)]
    emit({**info, "press": args.bench_press, "compression_ratio": ratio, "new_tokens": args.new_tokens,
          "runs": len(runs), "decode_tokens_per_second": median([r["decode_tokens_per_second"] for r in runs]),
          "decode_tokens_per_second_all": [r["decode_tokens_per_second"] for r in runs],
          "prefill_seconds": median([r["prefill_seconds"] for r in runs]),
          "kept_entries_mean": runs[-1]["kept_entries_mean"], "tokens": runs[-1]["tokens"]})
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    ev = sub.add_parser("eval", help="answer exported keepkv eval cells with every press and budget (raw answers)")
    ev.add_argument("--prompts", required=True, help="JSONL from keepkv eval ... --export-prompts")
    ev.add_argument("--gguf", required=True)
    ev.add_argument("--model", required=True, help="model name for the rows (e.g. SmolLM2-135M-Instruct)")
    ev.add_argument("--out", required=True, help="raw answers JSONL (appended to; finished rows are skipped)")
    ev.add_argument("--press", action="append", choices=PRESS_NAMES, help="repeatable; default all")
    ev.add_argument("--budget", action="append", type=float,
                    help="kept fraction in (0, 1] (1.0 = the uncompressed reference, method 'full'); "
                         "default 0.05 0.1 0.2 0.5")
    ev.add_argument("--protocol", action="append", choices=PROTOCOLS,
                    help="repeatable; agnostic (default): context compressed, then the question; aware: all but the "
                         "prompt's last token compressed (keepkv's query-aware protocol)")
    ev.add_argument("--shared-prefill", action="store_true",
                    help="one uncompressed prefill per cell and protocol, replayed through each press's hook "
                         "(same caches as the pipeline, see SharedPrefill; much faster with many presses)")
    ev.add_argument("--check-shared", action="store_true",
                    help="with --shared-prefill: also run the plain pipeline per row and stop if anything differs")
    ev.add_argument("--dtype", choices=DTYPES, default="float32")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--limit", type=int, default=0, help="only the first N cells (0 = all)")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--threads", type=int, default=2)
    be = sub.add_parser("bench", help="decode tokens/s at one compression ratio")
    be.add_argument("--gguf", required=True)
    be.add_argument("--prompt-ids", required=True)
    be.add_argument("--press", dest="bench_press", choices=PRESS_NAMES, default="snapkv")
    be.add_argument("--compression-ratio", type=float, default=0.9)
    be.add_argument("--dtype", choices=DTYPES, default="float32")
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--runs", type=int, default=5)
    be.add_argument("--warmup", type=int, default=1)
    be.add_argument("--threads", type=int, default=2)
    be.add_argument("--serve", action="store_true")
    args = p.parse_args(argv)
    if args.mode == "eval":
        args.press = args.press or list(PRESS_NAMES)
        args.budget = args.budget or list(DEFAULT_BUDGETS)
        args.protocol = list(dict.fromkeys(args.protocol or ["agnostic"]))
        bad = [b for b in args.budget if not 0.0 < b <= 1.0]
        if bad:
            p.error(f"--budget must be in (0, 1], got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    return run_eval(args) if args.mode == "eval" else run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
