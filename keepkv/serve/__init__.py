"""``keepkv serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one loaded model.

- :mod:`keepkv.serve.protocol`: request checks (OpenAI fields -> a :class:`CompletionJob` spec) and OpenAI-style
  error bodies;
- :mod:`keepkv.serve.variants`: per-request ``kv_budget`` / ``method`` overrides as engines sharing the weights;
- :mod:`keepkv.serve.scheduler`: the batching worker (one thread owns the model; requests become rows);
- :mod:`keepkv.serve.engine`: the worker's engine calls (``BatchWork`` + start / step / finish), replayable;
- :mod:`keepkv.serve.lockstep`: ``--tp N``: rank 0 announces every engine call, the other ranks replay it;
- :mod:`keepkv.serve.app`: the routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
  ``/health``) and server-sent events;
- :mod:`keepkv.serve.cli`: the ``keepkv serve`` subcommand.

fastapi and uvicorn come with the ``serve`` extra (``pip install 'keepkv[serve]'``); importing this package does not
import them.
"""
