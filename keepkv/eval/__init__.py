"""``keepkv.eval``: how keepkv measures itself.

Tasks (each a module with a ``run_*`` function; the command line ``keepkv eval`` is :mod:`keepkv.cli.eval`):

- :mod:`~keepkv.eval.fidelity`: per-layer attention-output perturbation after one compression, next-token KL
  and top-1 agreement against the full cache;
- :mod:`~keepkv.eval.ppl`: perplexity with streaming (chunked, teacher-forced) compression held at the budget;
- :mod:`~keepkv.eval.niah`: needle in a haystack (depths x context lengths), greedy answer, exact match;
- :mod:`~keepkv.eval.qa`: SQuAD v2 questions padded with distractor paragraphs, SQuAD F1 / exact match;
- :mod:`~keepkv.eval.report`: one Markdown table + plots from a results directory (peer rows included).

Results are JSON lines (:mod:`keepkv.eval.results`, which also documents the interface for peer engines); a
unit of work already present in the results directory is never recomputed. Heavy imports (torch, matplotlib)
happen inside the functions so that ``keepkv eval --help`` stays fast.
"""
