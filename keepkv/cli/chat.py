"""``keepkv chat MODEL``: a multi-turn chat over one KV cache kept and compressed across turns
(:class:`keepkv.chat.ChatSession`); one line of standard input is one user turn, each reply goes to stdout."""

from __future__ import annotations

import argparse
import sys

from keepkv.checks import require_text
from keepkv.cli.common import add_model_arguments, add_sampling_arguments, decoded, load_model, log


def add_parser(commands) -> None:
    chat = commands.add_parser(
        "chat", help="a multi-turn chat over one KV cache kept and compressed across turns",
        description="Chat with a model: each line of standard input is one user message (typed, or piped for a "
        "non-interactive run); each reply is printed to stdout. The KV cache is kept across turns and each turn "
        "is appended to it (never re-prefilled); with --kv-budget it is compressed to that share of the "
        "conversation (keepkv.chat.ChatSession).")
    add_model_arguments(chat)
    chat.add_argument("--system", default=None, help="a system prompt opening the conversation")
    add_sampling_arguments(chat, max_new_tokens=256)
    chat.set_defaults(run=run)


def read_turn(interactive: bool) -> str | None:
    """The next user turn: one line of standard input (UTF-8, newline stripped); ``None`` at its end."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    stdin_bytes = getattr(sys.stdin, "buffer", None)
    if stdin_bytes is not None:
        line = stdin_bytes.readline()
        return None if not line else decoded(line, "standard input").rstrip("\r\n")
    line = sys.stdin.readline()
    return None if not line else require_text(line, "standard input").rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    from keepkv.chat import ChatSession

    model = load_model(args)
    session = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        log.info("chatting with %s (%s); one message per line, Ctrl-D to end", model.name, session.method)
    while (text := read_turn(interactive)) is not None:
        if not text.strip():
            continue
        for piece in session.stream(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
