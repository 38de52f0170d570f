"""Fidelity to the full cache (``keepkv eval fidelity``; ``evaluation.md``, the seeds' own lens).

Protocol, per context (a real Paul Graham passage of ``context_tokens`` tokens, followed by its true next
``steps`` tokens):

1. one shared full prefill of the context (:meth:`keepkv.eval.session.EvalModel.shared_prefill`);
2. the full cache decodes the ``steps`` continuation tokens teacher-forced; forward hooks record each layer's
   attention block output (after ``W_O``) and the logits at every step;
3. for each method and budget, a copy of the prefill is compressed **inside step 0**
   (``CacheManager.compress_inside_next_forward``: after step 0's query joined the observation window,
   before it attends — so step 0 is "the step that compressed" and, for KeepKV with ``reference="last"``, its
   newest query is the merge's reference), then the same tokens are decoded; no further compression happens
   during the ``steps`` steps (the decode buffer has room for them).

Metrics per (method, budget, context): ``attn_rel_l2`` — ``||o - o_full|| / ||o_full||`` averaged over layers
and steps (``per_layer`` and ``per_step`` curves kept in the row), ``attn_rel_l2_step0`` (layers' mean at the
compression step), ``kl`` — mean ``KL(p_full || p_method)`` of the next-token distributions over the steps,
``top1`` — agreement of their argmaxes.
"""

from __future__ import annotations

import torch

from keepkv.eval.data import paul_graham_text
from keepkv.eval.metrics import kl_divergence, relative_l2, top1_agreement
from keepkv.eval.results import MethodConfig, ResultStore, unit_key


def fidelity_contexts(tokenizer, context_tokens: int, steps: int, count: int) -> dict[str, list[int]]:
    """``count`` disjoint passages of ``context_tokens + steps`` tokens from the Paul Graham essays."""
    text = paul_graham_text()
    ids = tokenizer.encode(text[: (context_tokens + steps) * count * 6])
    need = context_tokens + steps
    if len(ids) < need * count:
        raise ValueError("not enough text for the fidelity contexts")
    return {f"ctx{context_tokens}/p{i}": ids[i * need: (i + 1) * need] for i in range(count)}


def _record(model, engine, tokens: torch.Tensor, start: int, first_step_hook=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-force ``tokens [steps]`` from position ``start``: ``(outputs [steps, layers, hidden], logits
    [steps, vocab])``."""
    captured: list[torch.Tensor] = []
    handles = [layer.self_attn.register_forward_hook(lambda _m, _i, out: captured.append(out[0, -1].float()))
               for layer in model.network.model.layers]
    outputs, logits = [], []
    try:
        with torch.inference_mode():
            for step in range(tokens.shape[0]):
                if step == 0 and first_step_hook is not None:
                    first_step_hook()
                captured.clear()
                position = torch.tensor([start + step], device=model.device)
                logits.append(engine.decode_step(tokens[step: step + 1], position)[0].float())
                outputs.append(torch.stack(captured))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(outputs), torch.stack(logits)


def run_fidelity(model, configs: list[MethodConfig], budgets: list[float], context_tokens: int, steps: int,
                 contexts: int, store: ResultStore, seed: int = 0, progress: bool = True) -> None:
    from tqdm import tqdm

    passages = fidelity_contexts(model.tokenizer, context_tokens, steps, contexts)
    from keepkv.eval.prompted import priority_plan

    plan = [(c, b) for c, b in priority_plan(configs, budgets) if not c.is_full]
    bar = tqdm(total=len(plan) * len(passages), desc=f"fidelity {model.name}", disable=not progress, unit="run")
    for cell, ids in passages.items():
        todo = [(c, b) for c, b in plan if not store.done(unit_key("fidelity", model.name, c, b, cell))]
        bar.update(len(plan) - len(todo))
        if not todo:
            continue
        context, continuation = ids[:context_tokens], torch.tensor(ids[context_tokens:], device=model.device)
        prefill = model.shared_prefill([context], [c for c, _ in todo])
        full = model.engine_for(MethodConfig("full"), 1.0)
        full.start_from_prefill(prefill.caches, context_tokens, steps)
        full_out, full_logits = _record(model, full, continuation, context_tokens)
        for config, budget in todo:
            bar.set_postfix_str(f"{cell} {config.label} {budget}")
            engine = model.engine_for(config, budget, decode_slack=max(steps, 1))
            engine.start_from_prefill(prefill.caches, context_tokens, steps, compress=False)
            out, logits = _record(model, engine, continuation, context_tokens,
                                  engine.cache_manager.compress_inside_next_forward)
            kept = float(engine.cache_manager.entries_per_head().float().mean()) - steps + 1
            errors = relative_l2(full_out, out)  # [steps, layers]
            kl = kl_divergence(full_logits, logits)
            top1 = top1_agreement(full_logits, logits)
            base = {"model": model.name, **config.row_fields(), "budget": budget,
                    "kept_entries_per_head": kept, "cell": cell, "seed": seed, "steps": steps,
                    "context_tokens": context_tokens}
            rows = [
                {**base, "metric": "attn_rel_l2", "value": float(errors.mean()),
                 "per_layer": [round(float(v), 6) for v in errors.mean(0)],
                 "per_step": [round(float(v), 6) for v in errors.mean(1)]},
                {**base, "metric": "attn_rel_l2_step0", "value": float(errors[0].mean())},
                {**base, "metric": "kl", "value": float(kl.mean()),
                 "per_step": [round(float(v), 6) for v in kl]},
                {**base, "metric": "top1", "value": float(top1.mean())},
            ]
            store.write("fidelity", unit_key("fidelity", model.name, config, budget, cell), rows)
            bar.update(1)
    bar.close()
