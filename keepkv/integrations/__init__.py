"""Bridges from keepkv's methods to other libraries' models (each behind an optional extra).

- :mod:`keepkv.integrations.transformers`: every keepkv method inside a stock Hugging Face
  ``AutoModelForCausalLM`` (``pip install 'keepkv[hf]'``).

This package imports nothing heavy: import the submodule you need; only it imports its library.
"""
