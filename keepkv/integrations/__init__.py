"""Bridges from keepkv's methods to other libraries' models (each behind an optional extra).

- :mod:`keepkv.integrations.transformers`: every keepkv method inside a stock Hugging Face
  ``AutoModelForCausalLM`` (``pip install 'keepkv[hf]'``).
- :mod:`keepkv.integrations.lm_eval`: keepkv's engine as the lm-evaluation-harness model ``keepkv``
  (``pip install 'keepkv[lm-eval]'``; ``python -m keepkv.integrations.lm_eval --model keepkv ...``).

This package imports nothing heavy: import the submodule you need; only it imports its library.
"""
