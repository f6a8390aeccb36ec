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

    python scripts/eval_video.py                         # make eval-video: 240 test questions
    python scripts/eval_video.py --seed 7 --num-videos 60 --stats-json /tmp/eval.json
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
    return p.parse_args(argv)


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
    from pruning.selection import make_selector

    split = "test"
    samples = make_split(split, args.num_videos, seed=args.seed)
    wanted = set(args.methods.split(",")) if args.methods else None
    pipe = Qwen25VLPruneVid(str(args.model_path), preset="baseline", num_frames=NUM_FRAMES)
    text_config = pipe.model.config.get_text_config()
    num_layers = text_config.num_hidden_layers
    frames = [s.frames() for s in tqdm(samples, desc="render video", disable=args.no_progress)]
    full_inputs = [pipe.prepare_inputs(loaded(f, list(range(NUM_FRAMES))), s.question) for f, s in zip(frames, samples)]
    pipe.generate_from_inputs(full_inputs[0], max_new_tokens=1)  # warm-up

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

    def run(name: str, runner, inputs_list, pruning_layer_real=None) -> dict:
        answers, results = [], []
        for inputs in tqdm(inputs_list, desc=name, disable=args.no_progress):
            result = runner.generate_from_inputs(inputs, max_new_tokens=4)
            answers.append(result["generated_text"].strip())
            results.append(result)
        tiny, big = flops(results, pruning_layer_real)
        return {"answers": answers, "results": results, "flops": (tiny, big)}

    runs: dict[str, dict] = {}
    runs["baseline"] = run("baseline", pipe, full_inputs)
    for name in PRESET_METHODS:
        if wanted is None or name in wanted or name in ("default", "aggressive"):
            runs[name] = run(name, pipe.with_config(name), full_inputs)

    budgets = {}
    for name in ("default", "aggressive"):
        budgets[name] = max(1, round(sum(r["tokens_after"] for r in runs[name]["results"]) / len(samples)))
    for fraction in FRACTION_BUDGETS:
        budgets[f"{round(100 * fraction)}pct"] = max(1, round(fraction * full_visual))
    layer = 0  # random / divprune: the earliest place system B selects (after layer 0)
    fastv_layer = scale_layer_index(2, 32, num_layers)  # FastV's layer 2 of 32 at the same depth
    for label, keep in budgets.items():
        if wanted is None or "frame_subsample" in wanted:
            steps = max(1, min(NUM_STEPS, round(keep / tokens_per_step)))
            indices = uniform_frame_indices(NUM_FRAMES, FRAMES_PER_STEP * steps)
            sub_inputs = [pipe.prepare_inputs(loaded(f, indices), s.question) for f, s in zip(frames, samples)]
            runs[f"frame_subsample_{label}"] = run(f"frame_subsample_{label}", pipe, sub_inputs)
        for method, selector, at in (("random", "random", layer), ("divprune", "divprune", layer),
                                     ("fastv", "last_token_attention", fastv_layer)):
            if wanted is not None and method not in wanted:
                continue
            kwargs = {"keep": keep, "seed": 0} if selector == "random" else {"keep": keep}
            runner = pipe.with_config("stage2_only", pruning_layer=at, enable_cache_compression=True,
                                      selector=make_selector(selector, **kwargs))
            runs[f"{method}_{label}"] = run(f"{method}_{label}", runner, full_inputs, pruning_layer_real=2 if method == "fastv" else 0)

    baseline_answers = runs["baseline"]["answers"]
    base_ttft = sum(r["ttft_s"] for r in runs["baseline"]["results"]) / len(samples)
    methods = {}
    for name, r in runs.items():
        methods[name] = summarize(samples, r["answers"], r["results"], baseline_answers, *r["flops"], base_ttft)
        if name.split("_")[-1] in budgets and name not in PRESET_METHODS:
            methods[name]["budget"] = budgets[name.split("_")[-1]]
    stats = {
        "command": "python scripts/eval_video.py " + " ".join(argv or []),
        "machine": machine_info(torch, pipe.device),
        "model_path": str(args.model_path),
        "split": split,
        "seed": args.seed,
        "num_videos": args.num_videos,
        "budgets": budgets,
        "methods": methods,
        "examples": [{"question": s.question, "answer": s.answer,
                      **{name: runs[name]["answers"][i] for name in ("baseline", "default") if name in runs}}
                     for i, s in enumerate(samples[:8])],
    }
    print(format_table(methods))
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
        lines.append(f"{name:<26}{m['accuracy']:>7.3f}{m['accuracy_se']:>7.3f}{agree:>7}{m['visual_tokens']:>8.0f}"
                     f"{m['flops_ratio_7b']:>9.2f}{m['ttft_ratio']:>6.2f}  {per}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
