"""``keepkv eval {fidelity,ppl,niah,qa,report,all}``: the command line over :mod:`keepkv.eval` (imports of torch
and matplotlib are deferred to the run, so ``--help`` is fast).

Each task takes ``--model``, ``--methods`` (comma list: ``full,snapkv,keepkv:minnorm,snapkv+keepkv``),
``--budgets`` and ``--results DIR``; sizes default to a grid (``--grid quick|full``) and can be overridden.
``all --grid full --results results/eval --readme README.md`` runs every task of every model of the grid, then
``report`` (Markdown + PNGs in the results directory, and the README block between ``<!-- eval:begin`` and
``<!-- eval:end -->``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

TASKS = ("fidelity", "ppl", "niah", "qa", "tasks")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _common(parser: argparse.ArgumentParser, task: str | None) -> None:
    from keepkv.eval.grid import GRIDS

    parser.add_argument("--grid", default="quick", choices=list(GRIDS),
                        help="default sizes, models, methods and budgets (default: quick)")
    parser.add_argument("--results", default="results/eval", help="results directory (JSON lines + PNGs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of needles, questions and distractors")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if task == "all":
        parser.add_argument("--models", default=None, help="comma list: only these models of the grid")
        parser.add_argument("--tasks", default=",".join(TASKS),
                            help=f"comma list of tasks (default: {','.join(TASKS)})")
        parser.add_argument("--readme", default=None, help="README to rewrite the eval block of (after the report)")
        return
    if task in ("tasks", "export-tasks"):
        parser.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                            help="model name or path (same as --model)")
    parser.add_argument("--model", default=None, help="model name (default: the grid's first model)")
    if task != "export-tasks":
        parser.add_argument("--methods", default=None, help="comma list of configurations, e.g. full,snapkv,"
                            "keepkv:zip,snapkv+keepkv (default: the grid's)")
        parser.add_argument("--budgets", type=_floats, default=None, help="comma list of fractions, e.g. 0.05,0.1")
    if task == "fidelity":
        parser.add_argument("--context-tokens", type=int, default=None)
        parser.add_argument("--steps", type=int, default=None, help="teacher-forced decode steps after compressing")
        parser.add_argument("--contexts", type=int, default=None, help="number of passages")
    if task == "ppl":
        parser.add_argument("--tokens", type=int, default=None, help="tokens per document")
        parser.add_argument("--documents", type=int, default=None, help="number of documents (max 2)")
        parser.add_argument("--chunk", type=int, default=None, help="teacher-forcing chunk (cache slack)")
    if task == "niah":
        parser.add_argument("--lengths", type=_ints, default=None, help="context lengths in tokens, e.g. 2048,4096")
        parser.add_argument("--depths", type=_floats, default=None, help="needle depths in [0, 1], e.g. 0.1,0.5,0.9")
        parser.add_argument("--samples", type=int, default=None, help="haystack/needle draws per length and depth")
        parser.add_argument("--protocols", default=None,
                            help="comma list of agnostic (question after compression), aware (question compressed), "
                            "chunked (generate()'s chunked prefill of the whole prompt)")
    if task == "qa":
        parser.add_argument("--count", type=int, default=None, help="number of questions")
        parser.add_argument("--context-tokens", type=int, default=None)
        parser.add_argument("--batch", type=int, default=None, help="questions per shared-prefill batch")
    if task in ("tasks", "export-tasks"):
        parser.add_argument("--tasks", dest="families", default=None,
                            help="comma list of task families (keepkv.eval.tasks.FAMILIES: niah_single, multikey, "
                            "multivalue, multiquery, vt, qa_squad, qa_hotpot; default: the grid's)")
        parser.add_argument("--lengths", type=_ints, default=None,
                            help="target lengths in tokens (prompt + answer), e.g. 2048,4096; lengths above the "
                            "model's context are skipped")
        parser.add_argument("--samples", type=int, default=None, help="samples per task family and length")
        parser.add_argument("--first-sample", type=int, default=0,
                            help="generate only samples FIRST_SAMPLE .. SAMPLES-1 (default 0): extends a stored run "
                            "in new shared-prefill batches instead of regrouping (and rerunning) its old ones")
        parser.add_argument("--haystack", default=None, choices=["essays", "jargon", "licenses"],
                            help="haystack text of the needle tasks (default: essays)")
    if task == "tasks":
        parser.add_argument("--protocols", default=None,
                            help="comma list of aware (question compressed), agnostic (question after compression), "
                            "chunked (generate()'s chunked prefill of the whole prompt: compressions mid-prompt)")
        parser.add_argument("--dataset", default=None, metavar="PATH",
                            help="run the records of a .jsonl / .parquet file with kvpress's columns (context, "
                            "question, answer_prefix, answers, max_new_tokens) instead of generating tasks")
        parser.add_argument("--batch", type=int, default=None, help="samples per shared-prefill batch")
    if task == "export-tasks":
        parser.add_argument("--out", required=True, metavar="FILE.jsonl|FILE.parquet",
                            help="where to write the tasks (kvpress's columns + task, length, sample)")
    if task in ("niah", "qa"):
        parser.add_argument("--export-prompts", default=None, metavar="FILE.jsonl",
                            help="write one JSON line per cell (context, question, answers ...) for peer engines")
        parser.add_argument("--export-only", action="store_true", help="only write --export-prompts, run nothing")


def add_parser(commands) -> None:
    """Register ``keepkv eval`` on the top-level subparsers."""
    parser = commands.add_parser("eval", help="evaluate methods: fidelity, perplexity, needle, QA; report",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="eval_task", required=True)
    helps = {
        "fidelity": "attention-output perturbation, next-token KL and top-1 vs the full cache",
        "ppl": "perplexity with streaming compression held at the budget (ratio to full)",
        "niah": "needle in a haystack: depths x context lengths, exact match, heatmap",
        "qa": "SQuAD v2 questions among distractor paragraphs: F1 / exact match",
        "tasks": "RULER-style tasks (needles, multi-key/value/query, variable tracking, SQuAD/HotpotQA) or a "
                 "kvpress-column dataset (--dataset), both protocols",
    }
    for task, text in helps.items():
        sub = tasks.add_parser(task, help=text, description=text)
        _common(sub, task)
        sub.set_defaults(run=run_task, task=task)
        if task == "tasks":
            sub.set_defaults(results="results/tasks")
    export = tasks.add_parser("export-tasks", help="write keepkv's RULER-style tasks as a kvpress dataset "
                              "(.jsonl / .parquet)", description="Generate the tasks with MODEL's tokenizer and write "
                              "them with kvpress's columns, for kvpress or any other engine.")
    _common(export, "export-tasks")
    export.set_defaults(run=run_export_tasks)
    report = tasks.add_parser("report", help="Markdown table + plots from a results directory (peers included)")
    report.add_argument("--results", default="results/eval")
    report.add_argument("--readme", default=None, help="also rewrite this README's eval block")
    report.set_defaults(run=run_report)
    every = tasks.add_parser("all", help="every task of a grid, then the report (resumable)")
    _common(every, "all")
    every.set_defaults(run=run_all)


def _setup(args) -> None:
    import torch

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)


def _model_grid(args):
    from keepkv.eval.grid import grid

    grids = grid(args.grid)
    name = getattr(args, "model_arg", None) or getattr(args, "model", None)
    if name is None:
        return grids[0]
    for g in grids:
        if g.model == name:
            return g
    from dataclasses import replace

    return replace(grids[0], model=name)


def run_one(task: str, model, g, store, *, seed: int = 0, progress: bool = True, args=None) -> None:
    """Run one task of model grid ``g`` (``args`` may override sizes)."""
    def pick(name: str, default):
        value = getattr(args, name, None) if args is not None else None
        return default if value is None else value

    from keepkv.eval.results import MethodConfig

    methods = pick("methods", None)
    configs = [MethodConfig.parse(m) for m in methods.split(",")] if methods else g.method_configs()
    budgets = pick("budgets", g.budgets)
    if task == "fidelity":
        from keepkv.eval.fidelity import run_fidelity

        run_fidelity(model, configs, budgets, pick("context_tokens", g.fidelity_context),
                     pick("steps", g.fidelity_steps), pick("contexts", g.fidelity_contexts), store, seed=seed,
                     progress=progress)
    elif task == "ppl":
        from keepkv.eval.ppl import run_ppl

        run_ppl(model, configs, budgets, pick("tokens", g.ppl_tokens), pick("documents", g.ppl_documents), store,
                chunk=pick("chunk", g.ppl_chunk), seed=seed, progress=progress)
    elif task == "niah":
        from keepkv.eval.niah import run_niah

        run_niah(model, configs, budgets, pick("lengths", g.niah_lengths), pick("depths", g.niah_depths), store,
                 seed=seed, export_prompts=pick("export_prompts", None), progress=progress,
                 run=not pick("export_only", False), samples=pick("samples", g.niah_samples),
                 protocols=tuple(pick("protocols", ",".join(g.niah_protocols)).split(",")))
    elif task == "tasks":
        from keepkv.eval.tasks import run_tasks

        records, source = task_records(args)
        run_tasks(model, configs, budgets, store, families=_families(pick("families", None), g),
                  lengths=pick("lengths", g.task_lengths), samples=pick("samples", g.task_samples), records=records,
                  source=source, seed=seed, haystack_name=pick("haystack", "essays"), batch=pick("batch", g.task_batch),
                  protocols=_protocols(pick("protocols", ",".join(g.task_protocols))), progress=progress,
                  first_sample=pick("first_sample", 0))
    elif task == "qa":
        from keepkv.eval.qa import run_qa

        run_qa(model, configs, budgets, pick("count", g.qa_count), pick("context_tokens", g.qa_context), store,
               batch=pick("batch", g.qa_batch), seed=seed, export_prompts=pick("export_prompts", None),
               progress=progress, run=not pick("export_only", False))



def _families(text: str | None, g) -> list[str]:
    from keepkv.eval.tasks import check_families

    return check_families(text.split(",") if text else g.task_families)


def _protocols(text: str) -> tuple[str, ...]:
    from keepkv.errors import KeepKVError
    from keepkv.eval.prompted import PROTOCOLS

    protocols = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise KeepKVError(f"unknown protocol {', '.join(bad) or '(none)'}; allowed: {', '.join(PROTOCOLS)}")
    return protocols


def task_records(args) -> tuple[list | None, str | None]:
    """``(records, source)`` of ``--dataset`` (read and checked before any model is loaded), else ``(None, None)``."""
    path = getattr(args, "dataset", None) if args is not None else None
    if not path:
        return None, None
    from keepkv.eval.dataset import dataset_source, read_dataset
    from keepkv.eval.tasks import check_unique_cells

    return check_unique_cells(read_dataset(path)), f"dataset-{dataset_source(path)}"


def _check_task_args(args, g) -> None:
    """Bad task options fail before the model is loaded."""
    if args.task != "tasks":
        return
    from keepkv.errors import KeepKVError

    if args.batch is not None and args.batch < 1:
        raise KeepKVError(f"--batch must be >= 1, got {args.batch}")
    _check_first_sample(args, g)  # and --samples
    task_records(args)
    _families(args.families, g)
    _protocols(args.protocols or ",".join(g.task_protocols))
    if args.lengths is not None and (not args.lengths or min(args.lengths) < 128):
        raise KeepKVError(f"--lengths must be token counts >= 128, got {args.lengths}")


def _check_first_sample(args, g) -> None:
    """``--samples`` (if given) >= 1 and ``0 <= --first-sample < samples``; ``--first-sample`` only for generated
    tasks, not ``--dataset``."""
    from keepkv.errors import KeepKVError

    if args.samples is not None and args.samples < 1:
        raise KeepKVError(f"--samples must be >= 1, got {args.samples}")
    samples = args.samples or g.task_samples
    if getattr(args, "dataset", None) and args.first_sample:
        raise KeepKVError("--first-sample picks generated samples; it cannot be used with --dataset")
    if not 0 <= args.first_sample < samples:
        given = "--samples" if args.samples is not None else "the grid's default samples"
        raise KeepKVError(f"--first-sample must be in [0, samples) = [0, {samples}) ({given}), "
                          f"got {args.first_sample}")


def run_export_tasks(args) -> int:
    from keepkv.eval.dataset import dataset_format, write_dataset
    from keepkv.eval.tasks import generate_tasks, load_tokenizer, usable_lengths

    g = _model_grid(args)
    dataset_format(args.out)
    families = _families(args.families, g)
    _check_first_sample(args, g)
    tokenizer, context_limit = load_tokenizer(g.model)
    lengths = usable_lengths(args.lengths or g.task_lengths, context_limit)
    records = generate_tasks(tokenizer, families, lengths, args.samples or g.task_samples, args.seed,
                             args.haystack or "essays", progress=not args.no_progress, first_sample=args.first_sample)
    path = write_dataset(records, args.out)
    print(f"[keepkv eval] export-tasks {g.model}: {len(records)} records -> {path}", file=sys.stderr)
    return 0


def run_task(args) -> int:
    _setup(args)
    from keepkv.eval.results import ResultStore
    from keepkv.eval.session import EvalModel

    g = _model_grid(args)
    _check_task_args(args, g)
    store = ResultStore(args.results)
    started = time.perf_counter()
    model = EvalModel(g.model)
    run_one(args.task, model, g, store, seed=args.seed, progress=not args.no_progress, args=args)
    print(f"[keepkv eval] {args.task} {g.model}: {time.perf_counter() - started:.0f}s -> {args.results}",
          file=sys.stderr)
    return 0


def run_report(args) -> int:
    from keepkv.eval.report import write_report

    path = write_report(args.results, readme=args.readme)
    print(f"[keepkv eval] report: {path}", file=sys.stderr)
    return 0


def run_all(args) -> int:
    _setup(args)
    from keepkv.eval.grid import grid
    from keepkv.eval.report import write_report
    from keepkv.eval.results import ResultStore
    from keepkv.eval.session import EvalModel

    store = ResultStore(args.results)
    wanted_models = args.models.split(",") if args.models else None
    tasks = [t for t in args.tasks.split(",") if t]
    order = {t: i for i, t in enumerate(("fidelity", "niah", "ppl", "qa", "tasks"))}
    tasks.sort(key=lambda t: order.get(t, len(order)))
    failures: list[str] = []
    import torch
    for g in grid(args.grid):
        if wanted_models and g.model not in wanted_models:
            continue
        model = EvalModel(g.model)
        for task in tasks:
            if task not in g.tasks:
                continue
            started = time.perf_counter()
            try:
                run_one(task, model, g, store, seed=args.seed, progress=not args.no_progress)
            except Exception:  # one broken task must not lose the others' hour; the log has the traceback
                import traceback

                traceback.print_exc()
                failures.append(f"{task} {g.model}")
            seconds = time.perf_counter() - started
            print(f"[keepkv eval] {task} {g.model}: {seconds:.0f}s", file=sys.stderr, flush=True)
            with (store.directory / "walltime.log").open("a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {g.model} {task} {seconds:.0f}s "
                          f"threads={torch.get_num_threads()}\n")
        del model
    path = write_report(args.results, readme=args.readme)
    print(f"[keepkv eval] report: {path}", file=sys.stderr)
    if failures:
        print(f"[keepkv eval] FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
