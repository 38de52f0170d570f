"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.checks import require_int, require_real

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy; otherwise sample from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p``."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        """Types and ranges: ``temperature`` a finite number >= 0 (0 = greedy), ``top_k`` None or an integer
        >= 1, ``top_p`` None or a number in (0, 1], ``seed`` None or an integer in [0, 2**64) (what
        ``torch.Generator.manual_seed`` takes). Raises :class:`KeepKVError` naming the argument."""
        require_real(self.temperature, "temperature", 0.0)
        require_int(self.top_k, "top_k", 1, allow_none=True)
        require_real(self.top_p, "top_p", 0.0, 1.0, low_inclusive=False, allow_none=True)
        require_int(self.seed, "seed", 0, MAX_SEED, allow_none=True)

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
