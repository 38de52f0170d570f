"""``keepkv serve MODEL``: the OpenAI-compatible HTTP server. Its options and its run live with the server in
:mod:`keepkv.serve.cli`; this module only names them for :mod:`keepkv.cli`."""

from keepkv.serve.cli import add_serve_command as add_parser
from keepkv.serve.cli import run_serve as run

__all__ = ["add_parser", "run"]
