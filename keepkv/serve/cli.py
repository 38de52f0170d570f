"""``keepkv serve MODEL``: load the model once, then serve it over HTTP (uvicorn) until Ctrl-C.

With ``--tp N`` (``torchrun --nproc-per-node N -m keepkv serve MODEL --tp N``) every process loads its shard; rank 0
serves HTTP and the others replay its engine calls (:mod:`keepkv.serve.lockstep`). SIGINT / SIGTERM to the
launcher (torchrun forwards SIGTERM to every rank) stops rank 0 gracefully, which tells the others to stop: every
rank exits 0. A rank that dies or fails ends the others with an error naming the rank (exit status 2).
"""

from __future__ import annotations

import argparse
import signal
import sys

from keepkv.distributed.launch import tensor_parallel_command

TP_GRACEFUL_SHUTDOWN_SECONDS = 10
"""With ``--tp``: how long rank 0 waits for open connections when asked to stop, before cancelling them (their
slots are then freed and the other ranks told to stop)."""


def add_serve_command(commands) -> None:
    """Register ``serve`` on the ``keepkv`` subcommand parser (the model options are ``keepkv generate``'s)."""
    from keepkv.cli.common import add_model_arguments, integer, number

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health)",
        description="Serve a model over OpenAI's HTTP API. Concurrent requests arriving within --batch-window-ms are "
        "batched into one generation (see keepkv/serve/scheduler.py). Needs the serve extra: "
        "pip install 'keepkv[serve]'.")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=integer(0, 65535), default=8000, help="TCP port (default 8000; 0 = any free)")
    serve.add_argument("--max-batch", type=integer(1), default=8, metavar="N",
                       help="requests batched into one generation at most (default 8)")
    serve.add_argument("--batch-window-ms", type=number(0.0), default=20.0, metavar="MS",
                       help="how long the first queued request waits for others to join its batch (default 20)")
    serve.add_argument("--max-variants", type=integer(1), default=4, metavar="N",
                       help="cache settings kept ready at once, the server's own included: a request's kv_budget / "
                       "method override builds one on first use (default 4)")
    serve.add_argument("--served-model-name", default=None, metavar="ID",
                       help="the model id clients send (default: the model's name)")
    serve.add_argument("--tp", type=integer(1), default=1, metavar="N", help="tensor parallelism over N processes "
                       "started by `torchrun --nproc-per-node N -m keepkv serve MODEL --tp N`: rank 0 serves HTTP, "
                       "every rank runs each batch step in lockstep (gloo on CPU, NCCL on CUDA)")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Run ``keepkv serve`` (as one rank of the group with ``--tp N``: :mod:`keepkv.distributed.launch`)."""
    return tensor_parallel_command(_serve)(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from keepkv.serve.app import create_app
    except ImportError as err:
        from keepkv.errors import KeepKVError

        raise KeepKVError(f"keepkv serve needs fastapi and uvicorn ({err.name} is missing): "
                          "pip install 'keepkv[serve]'") from None
    from keepkv.cli.common import load_model

    model = load_model(args)
    if (getattr(args, "tp", 1) or 1) > 1:
        return _serve_tensor_parallel(model, args, uvicorn, create_app)
    app = create_app(model, max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000,
                     max_variants=args.max_variants, model_id=args.served_model_name)
    print(f"[keepkv] serving {app.state.model_id!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _serve_tensor_parallel(model, args: argparse.Namespace, uvicorn, create_app) -> int:
    """Rank 0: the server over a :class:`~keepkv.serve.lockstep.LockstepEngine`; other ranks:
    :func:`~keepkv.serve.lockstep.follow`. A stop signal is noted, not fatal: rank 0 shuts uvicorn down gracefully
    and sends ``("shutdown",)``, on which the others return; both then exit 0."""
    from keepkv.distributed.group import init_tensor_parallel
    from keepkv.serve.engine import LocalBatchEngine
    from keepkv.serve.lockstep import ControlChannel, LockstepEngine, follow
    from keepkv.serve.variants import ModelVariants

    handle = init_tensor_parallel(args.tp, args.device)  # the group load() joined
    channel = ControlChannel.create(handle)
    stop_signals: list[int] = []

    def note_stop(signum: int, _frame) -> None:
        stop_signals.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):  # uvicorn puts these back after its graceful shutdown
        signal.signal(signum, note_stop)
    if handle.rank != 0:
        follow(LocalBatchEngine(ModelVariants(model, args.max_variants)), channel)
        return 0
    failures: list[Exception] = []
    server = None

    def failed(error: Exception) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(model, max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000,
                     max_variants=args.max_variants, model_id=args.served_model_name,
                     engine=lambda variants: LockstepEngine(LocalBatchEngine(variants), channel, failed))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=TP_GRACEFUL_SHUTDOWN_SECONDS))
    print(f"[keepkv] serving {app.state.model_id!r} on http://{args.host}:{args.port}/v1 (tensor parallel over "
          f"{handle.world_size} ranks, {handle.backend})", file=sys.stderr)
    server.run()
    if failures:
        raise failures[0]
    return 0
