#!/usr/bin/env python
"""PruneVid's accuracy on the trained video-QA model, and what users would pick instead at equal budgets (make eval-video).

On the test split of the generated task (``data/video_qa.py``; or fresh questions with ``--seed S
--num-videos N``) the trained embedded Qwen2.5-VL (``models/trained/video_qa``, or ``--model-path``)
answers every question greedily:

* ``baseline`` (every stage off) and the presets ``stage1_only``, ``stage2_only``, ``default``,
  ``conservative``, ``aggressive`` (PruneVid as published);
* at equal final visual-token budgets (``default``'s and ``aggressive``'s mean, and 25% / 10% of the
  512 visual tokens): ``frame_subsample`` (fewer frames, uniformly: what users do today),
  ``random``, ``divprune`` (max-min diversity of the visual hidden states) and ``fastv`` (attention
  from the prompt's last token), the last three through the selector protocol at PruneVid's stage-2
  place with stage 1 off (``random`` and ``divprune`` after layer 0, the earliest place system B
  selects; ``fastv`` after layer 0 too: FastV's layer 2 of 32 at the same depth of a 4-layer model).

Per method: accuracy overall and per question type with its standard error, agreement with the
baseline's answers, mean visual tokens after stage 1 and at the end, the LLM prefill FLOPs ratio at
this model's shape and at Qwen2.5-VL-7B's (the same fractions of 2048 visual tokens), and the
measured TTFT ratio. ``--stats-json`` writes ``{"methods": {name: {...}}}``.

Each question's results are appended to ``--records`` (JSON lines, default beside ``--stats-json``) as they finish,
in two phases: the baseline and the presets, then (once every question's ``default`` and ``aggressive`` token counts
fix the equal budgets) the alternatives. ``--resume`` skips what is recorded for the same model, data and methods.
Under ``accelerate launch --num_processes N`` (on a machine without GPUs: ``accelerate launch --multi_gpu
--num_processes N``) the questions are split between the processes and the records gathered in question order; the
accuracies and agreements are the one-process ones, the times are left out (and the report says so). The random
baseline draws from a generator seeded by the question's index, so no result depends on which process ran it.

    python scripts/eval_video.py                         # make eval-video: 240 test questions
    python scripts/eval_video.py --seed 7 --num-videos 60 --stats-json /tmp/eval.json
    accelerate launch --num_processes 8 scripts/eval_video.py --model-path /path/to/model --resume
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cli import (
    ArgumentParser,
    UserError,
    check_model_path,
    check_output_file,
    machine_info,
    run_cli,
    set_torch_threads,
    write_json,
)
from evaluation.records import add_records_arguments

PRESET_METHODS = ("stage1_only", "stage2_only", "default", "conservative", "aggressive")
ALTERNATIVES = ("frame_subsample", "random", "divprune", "fastv")
FRACTION_BUDGETS = (0.25, 0.10)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=None, help="default: the shipped models/trained/video_qa")
    p.add_argument("--seed", type=int, default=0, help="task seed (0: the test split the model was validated beside)")
    p.add_argument("--num-videos", type=int, default=240, help="questions (one per video; default 240)")
    p.add_argument("--methods", default=None, help="comma-separated subset, e.g. baseline,default,random")
    p.add_argument("--stats-json", type=Path, default=Path("outputs_eval/eval_video.json"))
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    add_records_arguments(p, each="one JSON line per question and phase as it finishes",
                          default="--stats-json with the suffix .records.jsonl", same="model, data and methods")
    args = p.parse_args(argv)
    if args.records is None:
        args.records = args.stats_json.with_suffix(".records.jsonl")
    return args


def validate(args):
    from models.tiny.video_qa import SHIPPED_DIR

    if args.num_videos < 1:
        raise UserError(f"--num-videos must be >= 1, got {args.num_videos}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.model_path is None:
        args.model_path = SHIPPED_DIR
        if not (SHIPPED_DIR / "config.json").is_file():
            raise UserError(f"no trained video-QA model at {SHIPPED_DIR}: train it with make train-video-base")
    check_model_path(str(args.model_path))
    check_output_file(args.stats_json, "--stats-json")
    check_output_file(args.records, "--records")
    if args.records.resolve() == args.stats_json.resolve():
        raise UserError("--records and --stats-json must be different files")
    if args.methods is not None:
        known = {"baseline", *PRESET_METHODS, *ALTERNATIVES}
        unknown = sorted(set(args.methods.split(",")) - known)
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(sorted(known))}")


def loaded(frames, indices):
    """An in-memory video as the pipeline's ``LoadedVideo`` (frames sampled at ``indices`` of 16)."""
    from models.tiny.video_qa import video_metadata
    from pipelines.video_io import LoadedVideo

    return LoadedVideo(frames=frames[indices], indices=list(indices), total_frames=len(frames), fps=4.0,
                       metadata=video_metadata())


def summarize(samples, answers, results, baseline_answers, flops_tiny, flops_7b, base_ttft):
    from models.tiny.video_qa import accuracy_report, normalize

    report = accuracy_report(samples, answers)
    agree = [normalize(a) == normalize(b) for a, b in zip(answers, baseline_answers)] if baseline_answers else []
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ttft = mean([r["ttft_s"] for r in results])
    return {
        "accuracy": report["all"]["accuracy"],
        "accuracy_se": report["all"]["accuracy_se"],
        "per_type": {t: {"accuracy": v["accuracy"], "accuracy_se": v["accuracy_se"], "n": v["n"]}
                     for t, v in report.items() if t != "all"},
        "visual_tokens": mean([r["tokens_after"] for r in results]),
        "visual_tokens_after_stage1": mean([r["tokens_after_stage1"] for r in results]),
        "visual_tokens_input": mean([r["tokens_before_stage1"] for r in results]),
        "agreement_with_baseline": mean(agree) if agree else None,
        "flops_ratio_tiny": flops_tiny,
        "flops_ratio_7b": flops_7b,
        "ttft_s": ttft,
        "ttft_ratio": ttft / base_ttft if base_ttft else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    validate(args)
    set_torch_threads(args.threads)
    import torch
    from tqdm.auto import tqdm

    from data.video_qa import FRAMES_PER_STEP, GRID, NUM_FRAMES, NUM_STEPS, make_split
    from evaluation.flops import Qwen2_5_VLTextShape, llm_prefill_flops, qwen2_5_vl_prefill_flops
    from pipelines.prunevid import Qwen25VLPruneVid
    from pipelines.video_io import uniform_frame_indices
    from pruning.common import scale_layer_index
    from evaluation.records import RecordsError, gather_in_order, model_identity, open_run_records, process_state, shard
    from pruning.selection import make_selector

    split = "test"
    samples = make_split(split, args.num_videos, seed=args.seed)
    wanted = set(args.methods.split(",")) if args.methods else None
    state = process_state(None)  # one process, or one of `accelerate launch --num_processes N`
    sharded = state.num_processes > 1
    device = str(state.device) if sharded and state.device.type != "cpu" else None  # each process on its own GPU
    pipe = Qwen25VLPruneVid(str(args.model_path), preset="baseline", num_frames=NUM_FRAMES, device=device)
    text_config = pipe.model.config.get_text_config()
    num_layers = text_config.num_hidden_layers
    identity = {"evaluator": "eval_video", **model_identity(args.model_path), "split": split, "seed": args.seed,
                "num_videos": args.num_videos, "methods": sorted(wanted) if wanted else None}
    try:
        records = open_run_records(args.records, identity, state, resume=args.resume)
    except RecordsError as error:
        raise UserError(str(error)) from None
    resumed = len(records.done)
    mine = list(shard(len(samples), state.process_index, state.num_processes))
    todo = [i for i in mine if not all(f"{i}/{phase}" in records.done for phase in ("presets", "budgets"))]
    frames = {i: samples[i].frames() for i in tqdm(todo, desc="render video", disable=args.no_progress)}
    full_inputs = {i: pipe.prepare_inputs(loaded(frames[i], list(range(NUM_FRAMES))), samples[i].question) for i in todo}
    if todo:  # (questions recorded in both phases by a resumed run are neither rendered nor run)
        pipe.generate_from_inputs(full_inputs[todo[0]], max_new_tokens=1)  # warm-up

    real = Qwen2_5_VLTextShape()
    tokens_per_step = GRID * GRID  # visual tokens of one grid step (2 frames)
    full_visual = NUM_STEPS * tokens_per_step  # 512: every frame

    def flops(results, pruning_layer_real: int | None) -> tuple[float, float]:
        """(tiny, 7B) prefill FLOPs ratios to the baseline, averaged over the questions."""
        tiny, big = [], []
        for r in results:
            k = r["pruning_layer"]
            prompt, v0, v1, v2 = r["prompt_tokens"], r["tokens_before_stage1"], r["tokens_after_stage1"], r["tokens_after"]
            full = prompt - v0 + full_visual  # the baseline's prompt: every frame
            lengths = [prompt - v0 + (v1 if k is None or i <= k else v2) for i in range(num_layers)]
            tiny.append(llm_prefill_flops(text_config, lengths) / llm_prefill_flops(text_config, [full] * num_layers))
            scale = real.visual_tokens / full_visual
            shape = real if pruning_layer_real is None else Qwen2_5_VLTextShape(pruning_layer=pruning_layer_real)
            big.append(qwen2_5_vl_prefill_flops(shape, round(v1 * scale), round(v2 * scale))
                       / qwen2_5_vl_prefill_flops(real, real.visual_tokens, real.visual_tokens))
        return sum(tiny) / len(tiny), sum(big) / len(big)

    def answer(runner, inputs) -> dict:
        result = runner.generate_from_inputs(inputs, max_new_tokens=4)
        return {**result, "answer": result["generated_text"].strip()}

    def run_phase(phase: str, methods_of, progress_label: str) -> list[dict]:
        """Every method of ``methods_of(i)`` on each of this process's questions, recorded one question at a time
        (``<i>/<phase>``, skipped when already recorded); every process's records, in question order, on every
        process."""
        pairs = []
        pending = [i for i in mine if f"{i}/{phase}" not in records.done]
        for i in tqdm(mine, desc=progress_label, disable=args.no_progress or not pending):
            key = f"{i}/{phase}"
            if key not in records.done:
                records.append(key, {name: answer(runner, inputs) for name, (runner, inputs) in methods_of(i).items()})
            pairs.append((i, records.done[key]))
        return gather_in_order(pairs, state if sharded else None, to_all=True)

    presets = ["baseline"] + [name for name in PRESET_METHODS
                              if wanted is None or name in wanted or name in ("default", "aggressive")]
    preset_runners = {name: pipe if name == "baseline" else pipe.with_config(name) for name in presets}
    first = run_phase("presets", lambda i: {name: (runner, full_inputs[i]) for name, runner in preset_runners.items()},
                      "presets (per question)")

    budgets = {}
    for name in ("default", "aggressive"):  # from every question's result, whichever process ran it
        budgets[name] = max(1, round(sum(r[name]["tokens_after"] for r in first) / len(samples)))
    for fraction in FRACTION_BUDGETS:
        budgets[f"{round(100 * fraction)}pct"] = max(1, round(fraction * full_visual))
    layer = 0  # random / divprune: the earliest place system B selects (after layer 0)
    fastv_layer = scale_layer_index(2, 32, num_layers)  # FastV's layer 2 of 32 at the same depth
    budget_runners, pruning_layer_real, subsampled = {}, {}, {}
    for label, keep in budgets.items():
        if wanted is None or "frame_subsample" in wanted:
            steps = max(1, min(NUM_STEPS, round(keep / tokens_per_step)))
            subsampled[f"frame_subsample_{label}"] = uniform_frame_indices(NUM_FRAMES, FRAMES_PER_STEP * steps)
            budget_runners[f"frame_subsample_{label}"] = lambda i: pipe
        for method, selector, at in (("random", "random", layer), ("divprune", "divprune", layer),
                                     ("fastv", "last_token_attention", fastv_layer)):
            if wanted is not None and method not in wanted:
                continue

            def runner_for(i, selector=selector, keep=keep, at=at):
                # random: seeded by the question's index, so a question's draw does not depend on which
                # process runs it, or after which other questions
                kwargs = {"keep": keep, "seed": i} if selector == "random" else {"keep": keep}
                return pipe.with_config("stage2_only", pruning_layer=at, enable_cache_compression=True,
                                        selector=make_selector(selector, **kwargs))

            budget_runners[f"{method}_{label}"] = runner_for
            pruning_layer_real[f"{method}_{label}"] = 2 if method == "fastv" else 0

    def budget_methods(i):
        return {name: (runner_for(i), pipe.prepare_inputs(loaded(frames[i], subsampled[name]), samples[i].question)
                       if name in subsampled else full_inputs[i]) for name, runner_for in budget_runners.items()}

    second = run_phase("budgets", budget_methods, "equal-budget methods (per question)")
    if not state.is_main_process:
        return 0
    runs: dict[str, dict] = {}
    for name, phase in [(name, first) for name in presets] + [(name, second) for name in budget_runners]:
        results = [r[name] for r in phase]
        runs[name] = {"answers": [r["answer"] for r in results], "results": results,
                      "flops": flops(results, pruning_layer_real.get(name))}

    baseline_answers = runs["baseline"]["answers"]
    base_ttft = sum(r["ttft_s"] for r in runs["baseline"]["results"]) / len(samples)
    methods = {}
    for name, r in runs.items():
        methods[name] = summarize(samples, r["answers"], r["results"], baseline_answers, *r["flops"], base_ttft)
        if name.split("_")[-1] in budgets and name not in PRESET_METHODS:
            methods[name]["budget"] = budgets[name.split("_")[-1]]
        if sharded:  # several processes share the machine: their times are not the method's
            methods[name]["ttft_s"] = methods[name]["ttft_ratio"] = None
    stats = {
        "command": "python scripts/eval_video.py " + " ".join(argv or []),
        "machine": machine_info(torch, pipe.device),
        "model_path": str(args.model_path),
        "split": split,
        "seed": args.seed,
        "num_videos": args.num_videos,
        "budgets": budgets,
        "processes": state.num_processes,
        "records_file": str(args.records),
        "resumed_records": resumed,
        "methods": methods,
        "examples": [{"question": s.question, "answer": s.answer,
                      **{name: runs[name]["answers"][i] for name in ("baseline", "default") if name in runs}}
                     for i, s in enumerate(samples[:8])],
    }
    if sharded:
        stats["timing_note"] = (f"sharded over {state.num_processes} processes: accuracy and agreement only; the times "
                                "of processes sharing a machine are not the method's (run one process for TTFT)")
    print(format_table(methods))
    if sharded:
        print(f"note: {stats['timing_note']}")
    write_json(args.stats_json, stats)
    print(f"stats in {args.stats_json}")
    return 0


def format_table(methods: dict) -> str:
    from data.video_qa import QUESTION_TYPES

    head = f"{'method':<26}{'acc':>7}{'+-se':>7}{'agree':>7}{'tokens':>8}{'FLOPs 7B':>9}{'TTFT':>6}  " + " ".join(
        f"{t[:5]:>5}" for t in QUESTION_TYPES)
    lines = [head]
    for name, m in methods.items():
        agree = "-" if m["agreement_with_baseline"] is None else f"{m['agreement_with_baseline']:.2f}"
        per = " ".join(f"{m['per_type'][t]['accuracy']:>5.2f}" if not math.isnan(m["per_type"][t]["accuracy"])
                       else f"{'-':>5}" for t in QUESTION_TYPES)
        ttft = "-" if m["ttft_ratio"] is None else f"{m['ttft_ratio']:.2f}"
        lines.append(f"{name:<26}{m['accuracy']:>7.3f}{m['accuracy_se']:>7.3f}{agree:>7}{m['visual_tokens']:>8.0f}"
                     f"{m['flops_ratio_7b']:>9.2f}{ttft:>6}  {per}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
