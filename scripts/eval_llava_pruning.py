#!/usr/bin/env python
"""Compare system C (learned merger + pruner heads) with training-free baselines at the same token budgets.

On freshly generated test questions (``--task``: the shapes or the cluttered-scene VQA task; ``--seed``,
``--num-questions``), generates answers (greedy) with

* the unpruned base (the fork with nothing attached: upstream's computation),
* the learned method (``pruning_final.pt`` from ``train_llava_pruner.py``), as trained and at
  each budget (the merger's count follows the budget, the pruner heads keep their trained ratios),
* the same stages untrained (``untrained``: freshly initialised heads, seed ``--seed``; their
  logits are the distinctiveness prior plus random-head noise; inference temperature
  ``temperature_min`` as a trained run saves it), the ablation that shows what
  training changed,
* random selection, FastV (attention from the last prompt token, layer 2), DivPrune
  (max-min diversity of the vision features) and VisionZip (the vision tower's CLS attention plus
  merged contextual tokens) at each budget (``pruning/llava/baselines.py``),

and reports exact-match accuracy (overall and per question type), mean smoothed sentence BLEU
against the reference answers, agreement with the unpruned answers, the vision-token counts
after every stage (tiny model, measured; real LLaVA-1.5-7B shape, from the config), analytic
prefill FLOPs at the real size (32 layers, hidden 4096, MLP 11008, 576 image + ~60 text tokens)
and the measured prefill time ratio against the unpruned model in the same run.

A budget is the mean fraction of the image's vision tokens present per LLM layer (compute
matched; see ``pruning/llava/baselines.py``). Writes a JSON (``--output``, atomically) and prints a table;
``--stats-json`` also writes each run's accuracy with its binomial standard error, budget and per-type accuracy.

Every input is checked before the model is loaded: the stage file must come from
``train_llava_pruner.py`` and have been trained on the evaluated base (``--model-path``; the
base's fingerprint recorded in the file decides, so a copied base directory passes), FastV's
layer must lie inside the model, ``--output`` must be a writable file path.

Each question's answers (every run) are appended to ``--records`` (JSON lines) as its batch finishes; ``--resume``
skips the questions recorded for the same base, stages, config and data. Under ``accelerate launch --num_processes
N`` (without GPUs: ``accelerate launch --multi_gpu --num_processes N``) the batches, fixed by the question order
alone, are split between the processes and the records gathered in question order: the accuracies and agreements
are the one-process ones (the random baseline draws from a generator seeded by the batch's index), the times are
left out (the report says so).

    python scripts/eval_llava_pruning.py
    python scripts/eval_llava_pruning.py --budgets 0.25,0.5 --methods random,divprune --eval-size 200
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from cli import (
    REPO_ROOT,
    ArgumentParser,
    UserError,
    check_model_path,
    check_output_dir,
    check_output_file,
    set_torch_threads,
    load_or_explain,
    run_cli,
    write_json,
)
from evaluation.records import add_records_arguments

import torch

DEFAULT_RUN = REPO_ROOT / "runs" / "vision_token_pruning"
METHODS = ("learned", "untrained", "random", "fastv", "divprune", "visionzip")


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--budgets must be comma-separated fractions like 0.25,0.35,0.5, got {text!r}") from None
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise UserError(f"--budgets must be fractions in (0, 1], got {text!r}")
    return budgets


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {bad or text!r}; allowed: {', '.join(METHODS)}")
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None,
                        help="base LLaVA directory (default: the tiny base of --task: shapes trained into the cache on "
                             "first use, clutter shipped in models/trained/llava_clutter)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "pruning_final.pt",
                        help="learned stages from train_llava_pruner.py (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "vision_token_pruning.yaml",
                        help="config of the 'untrained' stages when no checkpoint is evaluated (default: %(default)s)")
    parser.add_argument("--budgets", default=None,
                        help="token budgets (default: 0.25,0.35,0.5 on shapes, 0.1,0.25,0.35,0.5 on clutter)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to run (default: %(default)s)")
    parser.add_argument("--task", default="clutter", choices=("shapes", "clutter"),
                        help="clutter: the cluttered 224 px scenes; shapes: the plain 112 px task (default: %(default)s)")
    parser.add_argument("--num-questions", "--eval-size", dest="eval_size", type=int, default=400,
                        help="test questions, generated from --seed (default: %(default)s)")
    parser.add_argument("--stats-json", type=Path, default=None,
                        help='also write {"methods": {name: {"accuracy", "accuracy_se", "budget", "per_type"}}} here')
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV ranking layer K (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-batches", type=int, default=2, help="prompt batches timed per method")
    parser.add_argument("--output", type=Path, default=DEFAULT_RUN / "eval_llava_pruning.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's, as for the recorded numbers in docs/BENCHMARKS.md)")
    parser.add_argument("--visualize", type=Path, default=None,
                        help="write DIR/selection.png: what the learned stages, DivPrune, FastV and VisionZip keep on the "
                             "first test questions, drawn on the patch grid (and DIR/selection.json)")
    parser.add_argument("--visualize-count", type=int, default=4, help="questions drawn (default: %(default)s)")
    parser.add_argument("--visualize-budget", type=float, default=0.25, help="budget drawn (default: %(default)s)")
    add_records_arguments(parser, each="one JSON line per question (every run's answer) as its batch finishes",
                          default="--output with the suffix .records.jsonl", same="base, stages, config and data")
    args = parser.parse_args(argv)
    if args.records is None:
        args.records = args.output.with_suffix(".records.jsonl")
    if args.budgets is None:
        args.budgets = "0.1,0.25,0.35,0.5" if args.task == "clutter" else "0.25,0.35,0.5"
    budgets, methods = parse_budgets(args.budgets), parse_methods(args.methods)
    if args.visualize is not None:
        check_output_dir(args.visualize, "--visualize")
        if not 0.0 < args.visualize_budget <= 1.0:
            raise UserError(f"--visualize-budget must be a fraction in (0, 1], got {args.visualize_budget}")
        if args.visualize_count > args.eval_size:
            raise UserError(f"--visualize-count {args.visualize_count} is more than the {args.eval_size} test questions")
    for key in ("eval_size", "batch_size", "timing_batches", "threads", "visualize_count"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    check_output_file(args.output, "--output")
    check_output_file(args.records, "--records")
    if args.records.resolve() == args.output.resolve():
        raise UserError("--records and --output must be different files")
    if args.stats_json is not None:
        check_output_file(args.stats_json, "--stats-json")
    check_model_path(args.model_path)
    if args.model_path is None and args.task == "clutter":
        from models.tiny.llava_vqa import shipped_clutter_base

        args.model_path = shipped_clutter_base()
    base_path = args.model_path
    if base_path is None:
        from models.tiny.llava_vqa import default_base_path

        base_path = str(default_base_path())
    check_fastv_layer(args, methods, base_path)
    checkpoint = None
    if "learned" in methods:
        checkpoint = read_stages(args.checkpoint)
        check_base(checkpoint, args.checkpoint, base_path)
    elif "untrained" in methods:
        read_config(args.config)
    return evaluate(args, budgets, methods, checkpoint)


def read_config(path: Path):
    """The config of the 'untrained' stages (``--config``), or a one-line error."""
    from pruning.llava.config import ConfigError, load_config

    if path.is_dir():
        raise UserError(f"--config {str(path)!r} is a directory: pass a YAML file")
    try:
        return load_config(path)
    except FileNotFoundError as error:
        raise UserError(f"--config: {error}") from None
    except (ConfigError, UnicodeDecodeError) as error:
        raise UserError(f"--config: {' '.join(str(error).split())}") from None


def read_stages(path: Path) -> dict:
    """The stage file at ``path`` (``--checkpoint``), loaded with ``weights_only`` and checked; else one line."""
    if path.is_dir():
        raise UserError(f"--checkpoint {str(path)!r} is a directory: pass a stage file such as pruning_final.pt")
    if not path.is_file():
        raise UserError(f"--checkpoint: no trained pruner at {path}: run `make train-llava` first, pass --checkpoint, "
                        "or leave 'learned' out of --methods")
    from models.tiny.llava_vqa import load_torch_file

    try:
        checkpoint = load_torch_file(path)
    except ValueError as error:
        raise UserError(f"--checkpoint {str(path)!r} is {error}") from None
    keys = ("config", "state_dict", "temperature", "pruning_layers", "use_merger", "use_pruners")
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in keys):
        hint = " (that is a training checkpoint: pass pruning_final.pt)" if isinstance(checkpoint, dict) and \
            "pruning" in checkpoint else ""
        raise UserError(f"--checkpoint {str(path)!r} is not a stage file from train_llava_pruner.py{hint}")
    from pruning.llava.config import ConfigError, config_from_dict

    try:
        config_from_dict(checkpoint["config"], "checkpoint")
    except ConfigError as error:
        raise UserError(f"--checkpoint {str(path)!r}: {' '.join(str(error).split())}") from None
    return checkpoint


def check_base(checkpoint: dict, path: Path, base_path: str) -> None:
    """The stages were trained on the base that is evaluated (recorded fingerprint, else path); else one line."""
    from models.tiny.llava_vqa import base_identity, base_mismatch

    if checkpoint.get("base_model") is None:
        print(f"warning: {path} records no base model; cannot check that it was trained on {base_path}")
        return
    problem = base_mismatch(checkpoint, base_identity(base_path))
    if problem:
        raise UserError(f"--checkpoint {str(path)!r} was {problem} (--model-path): evaluate it on its base, "
                        "or pass stages trained on this one")


def check_fastv_layer(args, methods: list[str], base_path: str) -> None:
    """FastV's layer K lies inside the LLM (1 .. layers - 1), read from the model's config (no weights loaded)."""
    if args.fastv_layer < 1:
        raise UserError(f"--fastv-layer must be >= 1 (FastV ranks with the attention of the layer before), "
                        f"got {args.fastv_layer}")
    if "fastv" not in methods:
        return
    from transformers import AutoConfig

    if not Path(base_path).exists() and args.model_path is None:  # the default base, not trained yet
        from models.tiny.llava import tiny_llava_dir  # its architecture: the base is trained from it

        base_path = str(tiny_llava_dir())
    config = load_or_explain("the LLaVA config", base_path, lambda: AutoConfig.from_pretrained(base_path))
    num_layers = config.text_config.num_hidden_layers
    if args.fastv_layer >= num_layers:
        raise UserError(f"--fastv-layer {args.fastv_layer} is past the model: its LLM has {num_layers} layers, "
                        f"so FastV can select at layers 1..{num_layers - 1}")


def evaluate(args, budgets, methods, checkpoint) -> int:
    from models.tiny.llava_vqa import load_pruning_base
    from evaluation.flops import LlavaShape, prefill_flops
    from pruning.llava.baselines import baseline_schedule, learned_schedule, schedule_selectors
    from pruning.llava.config import config_from_dict, vision_token_trajectory
    from pruning.llava.runtime import attach_pruning, detach_pruning, load_pruning, num_image_tokens
    from data.vqa_shapes import accuracy_by_type, chance_levels, encode_batch, normalize_answer, sentence_bleu
    from evaluation.records import (
        RecordsError,
        check_resume,
        gather_in_order,
        model_identity,
        open_run_records,
        process_state,
        shard,
    )
    from tqdm.auto import tqdm
    from models.tiny.llava_vqa import task_module

    task = task_module(args.task)

    model_path = args.model_path
    if model_path is None:
        from models.tiny.llava_vqa import trained_base_dir

        model_path = str(trained_base_dir())
    set_torch_threads(args.threads)
    cfg = config_from_dict(checkpoint["config"], "checkpoint") if checkpoint else read_config(args.config)
    # every run: (label, method, budget); the unpruned model first (the others' agreement is with it)
    runs = [("unpruned", "unpruned", None)]
    runs += [(f"{name}@trained", name, None) for name in ("learned", "untrained") if name in methods]
    runs += [(f"{method}@{budget}", method, budget) for budget in budgets for method in methods]
    # --resume with another configuration's records is refused before the model loads
    state = process_state(None)
    sharded = state.num_processes > 1
    identity = {"evaluator": "eval_llava_pruning", **model_identity(model_path), "task": args.task,
                "seed": args.seed, "num_questions": args.eval_size, "batch_size": args.batch_size,
                "fastv_layer": args.fastv_layer, "runs": [label for label, _, _ in runs],
                "stages": None if checkpoint is None else {k: checkpoint.get(k) for k in ("run_id", "steps")},
                "config": cfg.to_dict()}
    try:
        if args.resume:
            check_resume(args.records, identity)
    except RecordsError as error:
        raise UserError(str(error)) from None
    processor, model = load_pruning_base(model_path)
    model.eval().requires_grad_(False)
    if checkpoint:
        try:  # the stages fit this model (before any answer is generated)
            load_pruning(model, checkpoint)
        except ValueError as error:
            raise UserError(f"--checkpoint {str(args.checkpoint)!r}: {error}") from None
        detach_pruning(model)
    try:
        records = open_run_records(args.records, identity, state, resume=args.resume)
    except RecordsError as error:
        raise UserError(str(error)) from None
    resumed = len(records.done)
    num_layers = model.config.text_config.num_hidden_layers
    v = num_image_tokens(model.config)
    samples = task.make_split("heldout", args.eval_size, seed=args.seed)
    # the batches are fixed by the question order alone (not by the processes), so a batch's padding, its answers
    # and the random baseline's draw (seeded by the batch's index) are the same however the work is split
    spans = [range(start, min(start + args.batch_size, len(samples))) for start in range(0, len(samples), args.batch_size)]
    tokenizer = processor.tokenizer
    real = LlavaShape()
    real_layers, real_ratios = list(cfg.pruner.pruning_layers), list(cfg.pruner.keep_ratios)
    real_merged = cfg.merger.resolve_num_tokens(real.num_vision)

    def encode(span) -> dict:
        batch = encode_batch(processor, [samples[i] for i in span], with_answers=False)
        batch.pop("question_mask")
        return batch

    @torch.no_grad()
    def answer_batch(batch) -> tuple[list[str], list[int] | None, list[int] | None]:
        out = model.generate(**batch, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        trace = getattr(getattr(model.model, "vision_pruning", None), "last_trace", None)
        if trace is None:
            return answers, None, None
        return answers, list(trace.num_vision_tokens), list(trace.layer_tokens)

    @torch.no_grad()
    def prefill_seconds(timed: list[dict]) -> float:
        model(**timed[0])  # warm-up
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for batch in timed:
                model(**batch)
            best = min(best, time.perf_counter() - start)
        return best

    def attach_learned(budget, name="learned"):
        """Attach the learned (or untrained) stages at ``budget`` (None: as trained); returns the tiny schedule."""
        if name == "learned":
            pruning = load_pruning(model, checkpoint)
        else:  # untrained: the same architecture and config, fresh (seeded) initialisation
            torch.manual_seed(args.seed)
            pruning = attach_pruning(model, cfg)
            pruning.temperature = cfg.anneal.temperature_min  # inference temperature, as a trained run saves it
        pruning.eval()
        tiny = learned_schedule(budget, num_layers, v, pruning.merger.target_merge_tokens if pruning.merger else v,
                                pruning.pruning_layers, list(cfg.pruner.keep_ratios))
        pruning.keep_ratios = dict(zip(pruning.pruning_layers, tiny.keep_ratios))
        if pruning.merger is not None:  # the merger's count follows the budget
            pruning.merger.target_merge_tokens = tiny.merged
        return tiny

    def attach_baseline(method, budget, seed=None):
        tiny = baseline_schedule(method, budget, num_layers, v, args.fastv_layer)
        selectors = schedule_selectors(tiny, args.seed if seed is None else seed)
        attach_pruning(model, use_merger=False, use_pruners=False, selectors=selectors).eval()
        return tiny


    def attach(method, budget, batch_index=0):
        """Attach ``method`` at ``budget``; returns its tiny schedule (None: unpruned, nothing attached)."""
        if method == "unpruned":
            return None
        if method in ("learned", "untrained"):
            return attach_learned(budget, method)
        return attach_baseline(method, budget, seed=args.seed + 1000 * batch_index)

    t0 = time.perf_counter()
    print(f"base: {model_path}; {len(samples)} held-out questions; budgets {budgets}"
          + (f"; {state.num_processes} processes" if sharded else ""))
    pairs = []
    mine = shard(len(spans), state.process_index, state.num_processes)
    progress = tqdm(total=sum(len(spans[b]) for b in mine), desc="questions (every method)", unit="question",
                    disable=not state.is_main_process, dynamic_ncols=True)
    for b in mine:
        span = spans[b]
        if not all(str(i) in records.done for i in span):
            batch = encode(span)
            per_run = {}
            for label, method, budget in runs:
                attach(method, budget, b)
                per_run[label] = answer_batch(batch)
                detach_pruning(model)
            for k, i in enumerate(span):  # one record per question, as its batch finishes
                records.append(i, {label: {"answer": answers[k], "trajectory": trajectory, "layer_tokens": layers}
                                   for label, (answers, trajectory, layers) in per_run.items()})
        pairs += [(i, records.done[str(i)]) for i in span]
        progress.update(len(span))
    progress.close()
    items = gather_in_order(pairs, state if sharded else None)
    if not state.is_main_process:
        return 0
    seconds = {}
    if not sharded:  # timed in this process, every run on the same first batches as the unpruned model
        timed = [encode(span) for span in spans[: args.timing_batches]]
        for label, method, budget in runs:
            attach(method, budget)
            seconds[label] = prefill_seconds(timed)
            detach_pruning(model)
    unpruned_answers = [item["unpruned"]["answer"] for item in items]
    results = []

    def record(name, budget, schedule_tiny, real_flops, label) -> None:
        answers = [item[label]["answer"] for item in items]
        trajectory, layer_tokens = items[-1][label]["trajectory"], items[-1][label]["layer_tokens"]
        acc = accuracy_by_type(samples, answers)
        bleu = sum(sentence_bleu(a, s.answer) for a, s in zip(answers, samples)) / len(samples)
        agree = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, unpruned_answers)) / len(samples)
        results.append({
            "method": name, "budget": budget,
            "achieved_budget_tiny": None if schedule_tiny is None else round(schedule_tiny.achieved, 4),
            "vision_tokens_per_layer_tiny": None if schedule_tiny is None else list(schedule_tiny.layer_tokens),
            "vision_tokens_after_each_stage_tiny": trajectory if name != "unpruned" else [v],
            "sequence_length_per_layer_tiny": layer_tokens,
            "accuracy": acc["all"], "accuracy_se": standard_error(acc["all"], len(samples)),
            "accuracy_by_type": {k: acc[k] for k in task.QUESTION_TYPES if k in acc},
            "bleu": bleu, "agreement_with_unpruned": agree,
            "real_shape_prefill_flops": real_flops, "prefill_seconds": seconds.get(label),
            "examples": [{"question": s.question, "answer": s.answer, "prediction": a}
                         for s, a in list(zip(samples, answers))[:4]],
        })

    unpruned_flops = prefill_flops(real, [real.num_vision] * real.num_layers)
    for label, method, budget in runs:
        if method == "unpruned":
            record("unpruned", 1.0, None, unpruned_flops, label)
        elif method in ("learned", "untrained"):
            tiny = attach_learned(budget, method)  # the schedule only (nothing is run)
            detach_pruning(model)
            real_sched = learned_schedule(budget, real.num_layers, real.num_vision, real_merged, real_layers,
                                          real_ratios)
            pruned_in = [real_sched.layer_tokens[max(0, l - 1)] for l in real_layers]
            flops = prefill_flops(real, real_sched.layer_tokens, merged=real_sched.merged, pruner_layers=real_layers,
                                  pruner_vision=pruned_in)
            record(method, budget, tiny, flops, label)
        else:
            tiny = baseline_schedule(method, budget, num_layers, v, args.fastv_layer)
            real_sched = baseline_schedule(method, budget, real.num_layers, real.num_vision, args.fastv_layer)
            record(method, budget, tiny, prefill_flops(real, real_sched.layer_tokens), label)

    base_total, base_seconds = unpruned_flops["total"], seconds.get("unpruned")
    for r in results:
        r["real_shape_flops_ratio"] = r["real_shape_prefill_flops"]["total"] / base_total
        r["prefill_time_ratio"] = None if base_seconds is None else r["prefill_seconds"] / base_seconds
        r["accuracy_drop"] = results[0]["accuracy"] - r["accuracy"]
        r["bleu_drop"] = results[0]["bleu"] - r["bleu"]
    real_traj = vision_token_trajectory(real.num_vision, cfg)
    report = {
        "base_model": model_path,
        "checkpoint": str(args.checkpoint) if checkpoint else None,
        "eval_size": len(samples),
        "task": args.task,
        "seed": args.seed,
        "chance": chance_levels(samples, task.ANSWERS),
        "budget_definition": "mean over LLM layers of the fraction of the image's vision tokens present in the layer",
        "token_trajectory": {
            "stages": ["vision tower", "merger"] + [f"pruner @ layer {l}" for l in real_layers],
            "real_shape_vision": real_traj,
            "real_shape_vision_plus_text": [n + real.text_len for n in real_traj],
            "real_shape_text_tokens": real.text_len,
            "tiny_vision": next((r["vision_tokens_after_each_stage_tiny"] for r in results
                                 if r["method"] == "learned" and r["budget"] is None), None),
            "tiny_pruning_layers": checkpoint["pruning_layers"] if checkpoint else None,
        },
        "real_shape": {"layers": real.num_layers, "hidden": real.hidden, "mlp": real.mlp,
                       "vision_tokens": real.num_vision, "text_tokens": real.text_len,
                       "unpruned_prefill_tflops": base_total / 1e12},
        "timing": {"what": f"prefill forward of {args.timing_batches} batch(es) of {args.batch_size} prompts, best of 3",
                   "threads": torch.get_num_threads(), "unpruned_seconds": base_seconds},
        "results": results,
        "processes": state.num_processes,
        "records_file": str(args.records),
        "resumed_records": resumed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if sharded:
        report["timing_note"] = (f"sharded over {state.num_processes} processes: accuracy and agreement only; the times "
                                 "of processes sharing a machine are not the method's (run one process for the times)")
    if args.visualize is not None:
        report["pictures"] = write_selection_pictures(
            args, model, processor, task, samples[: args.visualize_count], methods, attach_learned, attach_baseline)
    write_json(args.output, report)
    print(format_table(report))
    if sharded:
        print(f"note: {report['timing_note']}")
    print(f"wrote {args.output}")
    if args.visualize is not None:
        print(f"wrote {report['pictures']['figure']}")
    if args.stats_json is not None:
        write_json(args.stats_json, method_stats(results, len(budgets) > 1))
        print(f"wrote {args.stats_json}")
    return 0


@torch.no_grad()
def write_selection_pictures(args, model, processor, task, samples, methods, attach_learned, attach_baseline) -> dict:
    """``--visualize DIR``: for ``samples`` (the first test questions), what the learned stages (merger centres, then
    the tokens kept after each pruner layer) and DivPrune / FastV / VisionZip keep at ``--visualize-budget``, drawn on
    the patch grid (``evaluation/llava_overlay.py``) into ``DIR/selection.png``; ``DIR/selection.json`` beside it
    holds each method's kept counts, its answers, and how many of the asked objects' patches it kept."""
    from data.vqa_shapes import encode_batch, normalize_answer
    from evaluation.llava_overlay import draw_selection_row, save_selection_figure, selection_panels
    from pruning.llava.runtime import detach_pruning, num_image_tokens

    budget = args.visualize_budget
    batch = encode_batch(processor, samples, with_answers=False)
    batch.pop("question_mask")
    grid = int(round(num_image_tokens(model.config) ** 0.5))
    asked = [task.asked_patches(s, grid) if hasattr(task, "asked_patches") else None for s in samples]
    runs = []  # (method, panels per sample, answers)
    learned = "learned" if "learned" in methods else "untrained" if "untrained" in methods else None
    chosen = ([learned] if learned else []) + [m for m in ("divprune", "fastv", "visionzip") if m in methods]
    for method in chosen:
        attach_learned(budget, method) if method in ("learned", "untrained") else attach_baseline(method, budget)
        out = model.generate(**batch, do_sample=False, max_new_tokens=3, pad_token_id=processor.tokenizer.pad_token_id)
        answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        trace = model.model.vision_pruning.last_trace
        panels = [selection_panels(trace, row) for row in range(len(samples))]
        if method not in ("learned", "untrained"):  # a baseline selects once: name its panel after it
            panels = [[(method, keep) for _, keep in p[-1:]] for p in panels]
        detach_pruning(model)
        runs.append((method, panels, answers))
    rows, stats = [], []
    for i, sample in enumerate(samples):
        said = ", ".join(f"{m}: {normalize_answer(a[i]) or '-'}" for m, _, a in runs)
        caption = f"Q: {sample.question}  A: {sample.answer}  |  {said}"
        panels = [panel for _, p, _ in runs for panel in p[i]]
        rows.append(draw_selection_row(sample.image, panels, grid, asked[i], caption))
        stats.append({"question": sample.question, "answer": sample.answer, "asked_patches": None if asked[i] is None
                      else int(asked[i].sum()), "methods": {m: {
                          "answer": normalize_answer(a[i]),
                          "kept": {name: int(keep.sum()) for name, keep in p[i]},
                          "asked_patches_kept": None if asked[i] is None else {
                              name: int((keep & asked[i]).sum()) for name, keep in p[i]}} for m, p, a in runs}})
    figure = save_selection_figure(Path(args.visualize) / "selection.png", rows)
    record = {"figure": str(figure), "budget": budget, "methods": chosen, "questions": stats}
    write_json(Path(args.visualize) / "selection.json", record)
    return record


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` questions."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


def method_stats(results: list[dict], several_budgets: bool) -> dict:
    """``{"methods": {name: {"accuracy", "accuracy_se", "budget", "per_type"}}}``, one entry per run: ``unpruned``;
    each method at each budget as ``<method>`` (one budget) or ``<method>_<budget>`` (several); the learned and
    untrained stages at their trained schedule as ``<method>_as_trained``."""
    methods = {}
    for r in results:
        if r["method"] == "unpruned":
            name = "unpruned"
        elif r["budget"] is None:
            name = f"{r['method']}_as_trained"
        else:
            name = f"{r['method']}_{r['budget']:g}" if several_budgets else r["method"]
        methods[name] = {"accuracy": r["accuracy"], "accuracy_se": r["accuracy_se"], "budget": r["budget"],
                         "per_type": r["accuracy_by_type"]}
    return {"methods": methods}


def format_table(report: dict) -> str:
    lines = [f"held-out exact match / BLEU on {report['eval_size']} questions; budget = mean vision-token fraction per layer",
             f"{'method':<11}{'budget':>8}{'tiny tokens/stage':>25}{'acc':>7}{'dAcc':>7}{'BLEU':>7}{'agree':>7}"
             f"{'FLOPs@7B':>10}{'time':>7}"]
    for r in report["results"]:
        budget = "trained" if r["budget"] is None else f"{r['budget']:.2f}"
        if r["achieved_budget_tiny"] is not None and r["budget"] is not None and abs(r["achieved_budget_tiny"] - r["budget"]) > 0.005:
            budget += f"~{r['achieved_budget_tiny']:.2f}"
        traj = "->".join(str(n) for n in (r["vision_tokens_after_each_stage_tiny"] or []))
        lines.append(f"{r['method']:<11}{budget:>8}{traj:>25}{r['accuracy']:>7.3f}{-r['accuracy_drop']:>+7.3f}"
                     f"{r['bleu']:>7.3f}{r['agreement_with_unpruned']:>7.3f}{r['real_shape_flops_ratio']:>10.3f}"
                     + (f"{r['prefill_time_ratio']:>7.2f}" if r["prefill_time_ratio"] is not None else f"{'-':>7}"))
    traj = report["token_trajectory"]
    lines.append(f"real LLaVA-1.5-7B vision tokens per stage: {traj['real_shape_vision']} "
                 f"(+{traj['real_shape_text_tokens']} text: {traj['real_shape_vision_plus_text']}); "
                 f"unpruned prefill {report['real_shape']['unpruned_prefill_tflops']:.2f} TFLOPs")
    chance = ", ".join(f"{k} {v['uniform']:.2f}/{v['majority']:.2f}" for k, v in report["chance"].items())
    lines.append(f"chance (uniform/majority): {chance}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
