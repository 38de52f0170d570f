"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.errors import KeepKVError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy; otherwise sample from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p``."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise KeepKVError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise KeepKVError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise KeepKVError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


def sample_next_token(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """``[batch]`` next token ids from float logits ``[batch, vocab]``."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.shape[-1]:
        kth_best = torch.topk(scaled, sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth_best, -float("inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        outside = (cumulative - sorted_logits.softmax(dim=-1)) >= sampling.top_p  # keep the token crossing top_p
        sorted_logits = sorted_logits.masked_fill(outside, -float("inf"))
        scaled = torch.full_like(scaled, -float("inf")).scatter(-1, order, sorted_logits)
    probabilities = scaled.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
