"""``keepkv serve MODEL``: load the model once, then serve it over HTTP (uvicorn) until Ctrl-C."""

from __future__ import annotations

import argparse
import sys


def add_serve_command(commands) -> None:
    """Register ``serve`` on the ``keepkv`` subcommand parser (the model options are ``keepkv generate``'s)."""
    from keepkv.cli import _add_model_arguments, _integer, _number

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health)",
        description="Serve a model over OpenAI's HTTP API. Concurrent requests arriving within --batch-window-ms are "
        "batched into one generation (see keepkv/serve/scheduler.py). Needs the serve extra: "
        "pip install 'keepkv[serve]'.")
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_integer(0, 65535), default=8000, help="TCP port (default 8000; 0 = any free)")
    serve.add_argument("--max-batch", type=_integer(1), default=8, metavar="N",
                       help="requests batched into one generation at most (default 8)")
    serve.add_argument("--batch-window-ms", type=_number(0.0), default=20.0, metavar="MS",
                       help="how long the first queued request waits for others to join its batch (default 20)")
    serve.add_argument("--max-variants", type=_integer(1), default=4, metavar="N",
                       help="cache settings kept ready at once, the server's own included: a request's kv_budget / "
                       "method override builds one on first use (default 4)")
    serve.add_argument("--served-model-name", default=None, metavar="ID",
                       help="the model id clients send (default: the model's name)")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from keepkv.serve.app import create_app
    except ImportError as err:
        from keepkv.errors import KeepKVError

        raise KeepKVError(f"keepkv serve needs fastapi and uvicorn ({err.name} is missing): "
                          "pip install 'keepkv[serve]'") from None
    from keepkv.cli import _load

    model = _load(args)
    app = create_app(model, max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000,
                     max_variants=args.max_variants, model_id=args.served_model_name)
    print(f"[keepkv] serving {app.state.model_id!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
