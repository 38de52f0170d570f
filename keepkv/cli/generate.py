"""``keepkv generate MODEL``: a continuation of one prompt, streamed to stdout (statistics to stderr); with
``--tp N`` one rank of ``torchrun --nproc-per-node N -m keepkv generate ... --tp N`` (:mod:`keepkv.distributed`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keepkv.checks import require_text
from keepkv.cli.common import add_model_arguments, add_sampling_arguments, decoded, integer, load_model, log
from keepkv.distributed.launch import tensor_parallel_command
from keepkv.errors import KeepKVError


def add_parser(commands) -> None:
    generate = commands.add_parser("generate", help="generate text from a prompt (streams to stdout; stats to "
                                   "stderr)", description="Generate a continuation of a prompt.")
    add_model_arguments(generate)
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text (default: read standard input)")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    add_sampling_arguments(generate, max_new_tokens=128)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--tp", type=integer(1), default=1, metavar="N", help="tensor parallelism over N "
                          "processes started by `torchrun --nproc-per-node N -m keepkv generate ... --tp N` (heads "
                          "and MLP columns split; gloo on CPU, NCCL on CUDA; only rank 0 prints)")
    generate.set_defaults(run=run)


def read_prompt_file(path: str) -> str:
    """The text of ``--prompt-file``; a missing, unreadable or non-UTF-8 file is a :class:`KeepKVError`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeepKVError(f"--prompt-file {path}: no such file") from None
    except OSError as err:
        raise KeepKVError(f"--prompt-file {path} cannot be read: {err.strerror or err}") from None
    return decoded(data, f"--prompt-file {path}")


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from ``--prompt``, ``--prompt-file`` or standard input: valid, non-blank Unicode text."""
    if args.prompt_file is not None:
        prompt = read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        prompt = require_text(args.prompt, "--prompt")  # undecodable argv bytes arrive as lone surrogates
    else:
        stdin_bytes = getattr(sys.stdin, "buffer", None)
        prompt = decoded(stdin_bytes.read(), "standard input") if stdin_bytes else require_text(
            sys.stdin.read(), "standard input")
    if not prompt.strip():
        raise KeepKVError("the prompt is empty: give at least one non-blank character")
    return prompt


def _generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)  # before the model loads: a bad prompt costs nothing
    model = load_model(args)
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


run = tensor_parallel_command(_generate)
"""Run ``keepkv generate`` (as one rank of the group with ``--tp N``: :mod:`keepkv.distributed.launch`)."""
