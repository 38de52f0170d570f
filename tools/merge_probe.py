"""Look inside KeepKV's merges on real passages: per passage and configuration, the next-token KL to the full cache
(mean over the steps and at step 0, the step whose query drives the compression), the merged keys' length
relative to their group's longest member, and the share of each group's merge weight that its evicted members hold.

The fidelity protocol of :mod:`keepkv.eval.fidelity` (a full prefill of a Paul Graham passage, compression inside
the next step, teacher-forced steps after it), on chosen passages, with the merge op instrumented (this tool
wraps :func:`keepkv.ops.merge._minnorm_keys` and :func:`keepkv.ops.merge.cap_evicted_weight` for the length of
the run; the library is not changed). The evicted share is read where the dominance guard would apply it, so a
configuration reports it only with ``max_evicted_weight < 1``; ``0.999999`` measures without capping in effect.

    python tools/merge_probe.py --model Qwen2.5-Coder-1.5B-Instruct --passages 0,4,6 --budget 0.1 \\
        --methods "keepkv@reference=ema@max_evicted_weight=0.999999;keepkv@max_evicted_weight=0.999999"

Used for ``docs/keepkv-quality.md`` ("One merge reference: the newest queries").
"""

from __future__ import annotations

import argparse
from typing import Self

import torch

import keepkv.ops.merge as merge_op
from keepkv.eval import fidelity
from keepkv.eval.metrics import kl_divergence
from keepkv.eval.results import MethodConfig
from keepkv.eval.session import EvalModel


class Probe:
    """Collects per-group numbers from the wrapped merge functions (eager runs only)."""

    def __init__(self) -> None:
        self.key_ratio: list[torch.Tensor] = []
        self.evicted_share: list[torch.Tensor] = []
        self._minnorm, self._cap = merge_op._minnorm_keys, merge_op.cap_evicted_weight

    def __enter__(self) -> Self:
        def minnorm(key_mean, member_logits, log_p, log_P, segments, queries, longest, max_scale):
            corrected, usable = self._minnorm(key_mean, member_logits, log_p, log_P, segments, queries, longest,
                                              max_scale)
            valid = torch.isfinite(log_P)
            ratio = torch.linalg.vector_norm(corrected, dim=-1) / longest.clamp_min(1e-12)
            self.key_ratio.append(ratio[valid & usable].float())
            return corrected, usable

        def cap(weight, is_target, segments, bound):
            share = segments.sum(torch.where(is_target, 0.0, weight))
            has_target = segments.sum(is_target.to(weight.dtype)) > 0
            self.evicted_share.append(share[has_target].float())
            return self._cap(weight, is_target, segments, bound)

        merge_op._minnorm_keys, merge_op.cap_evicted_weight = minnorm, cap
        return self

    def __exit__(self, *exc) -> None:
        merge_op._minnorm_keys, merge_op.cap_evicted_weight = self._minnorm, self._cap

    def summary(self) -> str:
        parts = []
        if self.key_ratio:
            ratio = torch.cat(self.key_ratio)
            q50, q99 = torch.quantile(ratio, torch.tensor([0.5, 0.99])).tolist()
            parts.append(f"key/longest median {q50:.2f} q99 {q99:.2f} max {ratio.max():.2f} ({len(ratio)} groups)")
        if self.evicted_share:
            share = torch.cat(self.evicted_share)
            parts.append(f"evicted share median {share.median():.2f}, >0.5 {(share > 0.5).float().mean():.2f}, "
                         f">0.9 {(share > 0.9).float().mean():.2f}")
        return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen2.5-Coder-1.5B-Instruct")
    parser.add_argument("--passages", default="0,4,6", help="passage numbers of the fidelity set (ctx<N>/p<i>)")
    parser.add_argument("--methods", required=True, help="configurations separated by ';'")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    model = EvalModel(args.model)
    wanted = [int(p) for p in args.passages.split(",")]
    passages = fidelity.fidelity_contexts(model.tokenizer, args.context_tokens, args.steps, max(wanted) + 1)
    configs = [MethodConfig.parse(text) for text in args.methods.split(";")]
    for number in wanted:
        ids = passages[f"ctx{args.context_tokens}/p{number}"]
        context = ids[: args.context_tokens]
        continuation = torch.tensor(ids[args.context_tokens:], device=model.device)
        prefill = model.shared_prefill([context], configs)
        full = model.engine_for(MethodConfig("full"), 1.0)
        full.start_from_prefill(prefill.caches, args.context_tokens, args.steps)
        _, full_logits = fidelity._record(model, full, continuation, args.context_tokens)
        for config in configs:
            engine = model.engine_for(config, args.budget, decode_slack=args.steps)
            engine.start_from_prefill(prefill.caches, args.context_tokens, args.steps, compress=False)
            with Probe() as probe:
                _, logits = fidelity._record(model, engine, continuation, args.context_tokens,
                                             engine.cache_manager.compress_inside_next_forward)
            kl = kl_divergence(full_logits, logits)
            print(f"p{number} {config.label}: KL {kl.mean():.3f} (step 0: {kl[0]:.2f}); {probe.summary()}",
                  flush=True)


if __name__ == "__main__":
    main()
