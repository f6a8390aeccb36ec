#!/usr/bin/env python
"""Sweep PruneVid's stage 1 (token merging) over tau x cluster_ratio x temporal_segment_ratio (``make sweep-video``).

Default grid: tau 0.7,0.8,0.9 x cluster_ratio 0.3,0.5,0.7 x temporal_segment_ratio 0.25,0.5 (18 settings),
stage 1 alone (the ``stage1_only`` preset with the swept knobs), on the generated demo video and the
embedded tiny Qwen2.5-VL (CPU, seconds). Real weights on a GPU::

    python scripts/sweep_stage1.py clip.mp4 "What is the person doing?" \\
        --model-path Qwen/Qwen2.5-VL-7B-Instruct --device cuda --output runs/sweep.json

The model is loaded once; every setting is a ``Qwen25VLPruneVid.with_config(...)`` view of it (same
weights, same processor), and the video is decoded and preprocessed once, so every setting sees
the same inputs. First a warm-up baseline run (not timed), then the baseline (every stage off), then
each setting; ``--with-stage2`` runs the ``default`` preset (stage 2 at ``--keep-ratio``, stage 3 on)
with the swept stage-1 knobs instead.

Per setting the JSON holds: ``tokens_before_stage1``, ``tokens_after_stage1``, ``stage1_compression``
(``1 - after / before``), ``num_segments``, the static/dynamic split (``static_tokens_after_stage1`` /
``dynamic_tokens_after_stage1``: merged tokens; ``static_tokens_before_stage1`` /
``dynamic_tokens_before_stage1``: the original tokens they came from), ``tokens_after`` (stage 2) and
``total_compression``, ``ttft_s`` (median over ``--repeats``, default 3) and ``ttft_speedup`` over the baseline,
``token_agreement`` (fraction of identical generated tokens, position by position, over the longer of
the two) and ``exact_match`` against the baseline's greedy tokens, the generated text. ``baseline``
holds the same numbers for the unpruned model; its ``token_agreement`` / ``exact_match`` compare it
with the warm-up baseline run (a determinism check: 1.0 / true). ``command`` and ``machine`` say how
and where it ran. Bad input: one line on stderr, exit code 2, nothing written: every flag, the output
path, the device, the video, ``--pruning-layer`` against the model's layer count and the prompt against
its context are checked before the weights are loaded. The JSON is written once, at the end, through a
temporary file renamed into place; Ctrl-C exits 130 and leaves no file.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from cli import (
    ArgumentParser,
    UserError,
    check_device,
    check_output_file,
    check_video_path,
    check_video_prompt_against_model,
    configure_torch_threads,
    load_video_or_explain,
    machine_info,
    run_cli,
    write_json,
)

DEFAULT_QUESTION = "What is moving in the video, and in which direction?"
DEFAULT_TAUS = (0.7, 0.8, 0.9)
DEFAULT_CLUSTER_RATIOS = (0.3, 0.5, 0.7)
DEFAULT_SEGMENT_RATIOS = (0.25, 0.5)
RECOMMENDED = {"tau": (0.7, 0.9), "cluster_ratio": (0.3, 0.8), "temporal_segment_ratio": (0.1, 0.5)}


def _float_list(text: str) -> tuple[float, ...]:
    """``"0.7,0.8"`` -> ``(0.7, 0.8)``: numbers in (0, 1], no duplicates (argparse ``type``)."""
    items = [item.strip() for item in text.split(",")]
    try:
        if any(not item for item in items):
            raise ValueError
        values = tuple(float(item) for item in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None
    for value in values:
        if not 0.0 < value <= 1.0:  # also rejects nan
            raise argparse.ArgumentTypeError(f"values must be in (0, 1], got {value:g}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value is listed twice: {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="sweep_stage1.py", description=__doc__.split("\n\n")[0])
    p.add_argument("video", nargs="?", type=Path, default=None, help="video file (default: the generated demo video)")
    p.add_argument("question", nargs="?", default=DEFAULT_QUESTION, help=f"default: {DEFAULT_QUESTION!r}")
    p.add_argument("-q", "--question", dest="question_option", default=None, help="the question (same as the positional one)")
    p.add_argument("--taus", type=_float_list, default=DEFAULT_TAUS,
                   help="comma list in (0, 1], recommended 0.7-0.9 (default 0.7,0.8,0.9)")
    p.add_argument("--cluster-ratios", type=_float_list, default=DEFAULT_CLUSTER_RATIOS,
                   help="comma list in (0, 1], recommended 0.3-0.8 (default 0.3,0.5,0.7)")
    p.add_argument("--temporal-segment-ratios", type=_float_list, default=DEFAULT_SEGMENT_RATIOS,
                   help="comma list in (0, 1], recommended 0.1-0.5 (default 0.25,0.5)")
    p.add_argument("--with-stage2", action="store_true",
                   help="also run stage 2 (and stage 3): the 'default' preset with the swept stage-1 knobs (default: stage 1 only)")
    p.add_argument("--keep-ratio", type=float, default=None, help="stage 2 keep ratio with --with-stage2 (default: the preset's 0.4)")
    p.add_argument("--pruning-layer", type=int, default=None,
                   help="stage 2 layer with --with-stage2 (default: the preset's 10 of 28, scaled to the model depth)")
    p.add_argument("--output", type=Path, default=Path("stage1_sweep_results.json"),
                   help="the results JSON (default ./stage1_sweep_results.json)")
    p.add_argument("--model-path", default=None, help="Qwen2.5-VL directory or hub id (default: the embedded tiny model)")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled uniformly from the video (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy decoding length (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; ttft_s is their median (default 3)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--attn-implementation", default=None, choices=("sdpa", "eager"), help="default: the model's (sdpa)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 for the embedded tiny model on CPU; torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.question_option is not None:
        args.question = args.question_option
    return args


def validate(args) -> None:
    """Check every argument before any work is done."""
    from pruning.video.prunevid import PruneVidConfig

    for flag, value, minimum in (("--num-frames", args.num_frames, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                                 ("--repeats", args.repeats, 1), ("--threads", args.threads, 1)):  # fmt: skip
        if value is not None and value < minimum:
            raise UserError(f"{flag} must be >= {minimum}, got {value}")
    if not args.question.strip():
        raise UserError("the question is empty: pass a non-empty question")
    check_video_path(args.video)
    check_output_file(args.output, "--output")
    check_device(args.device)
    if not args.with_stage2 and (args.keep_ratio is not None or args.pruning_layer is not None):
        raise UserError("--keep-ratio / --pruning-layer configure stage 2: add --with-stage2 (the sweep is stage 1 only by default)")
    for flag, knob, value in (("--keep-ratio", "keep_ratio", args.keep_ratio), ("--pruning-layer", "pruning_layer", args.pruning_layer)):
        try:
            if value is not None:
                PruneVidConfig(**{knob: value})
        except ValueError as error:
            raise UserError(f"{flag}: {error}") from None


def check_against_model(args, video):
    """The model's config and processor (not its weights) against the flags; returns ``(processor, CPU inputs)``."""
    return check_video_prompt_against_model(args.model_path, video, args.question, args.max_new_tokens,
                                            args.pruning_layer)


def agreement(reference: list[int], ids: list[int]) -> tuple[float, bool]:
    """(fraction of positions with the same token, over the longer sequence; exact match)."""
    same = sum(a == b for a, b in zip(reference, ids))
    return same / max(len(reference), len(ids), 1), reference == ids


def _ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def run_setting(pipe, inputs, args, reference_ids=None) -> dict:
    """Generate ``--repeats`` times; the numbers of the first run, the median TTFT of all."""
    from pipelines.prunevid import STAGE1_SPLIT_KEYS

    runs = [pipe.generate_from_inputs(inputs, max_new_tokens=args.max_new_tokens) for _ in range(args.repeats)]
    r = runs[0]
    before1, after1 = r["tokens_before_stage1"], r["tokens_after_stage1"]
    entry = {
        "tokens_before_stage1": before1,
        "tokens_after_stage1": after1,
        "stage1_compression": 1.0 - after1 / before1 if before1 else 0.0,
        "num_segments": r.get("num_segments"),
        **{key: r[key] for key in STAGE1_SPLIT_KEYS},
        "tokens_before_stage2": r["tokens_before"],
        "tokens_after": r["tokens_after"],
        "total_compression": r["total_compression_ratio"],
        "prompt_tokens": r["prompt_tokens"],
        "kv_cache_length_per_layer": r["kv_cache_length_per_layer"],
        "ttft_s": statistics.median(run["ttft_s"] for run in runs),
        "ttft_s_runs": [run["ttft_s"] for run in runs],
        "generate_s": statistics.median(run["generate_s"] for run in runs),
        "generated_text": r["generated_text"],
        "generated_ids": r["generated_ids"],
    }
    if any(run["generated_ids"] != r["generated_ids"] for run in runs[1:]):
        entry["repeats_disagree"] = True  # greedy decoding should be deterministic on a fixed device
    if reference_ids is not None:
        entry["token_agreement"], entry["exact_match"] = agreement(reference_ids, r["generated_ids"])
    return entry


def main(argv=None) -> int:
    args = parse_args(argv)
    validate(args)

    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from pipelines.prunevid import Qwen25VLPruneVid

    hf_logging.disable_progress_bar()
    configure_torch_threads(args.threads, args.model_path, args.device)
    video_path, video = load_video_or_explain(args.video, args.num_frames)  # bad video: fail before loading the model
    processor, inputs = check_against_model(args, video)  # layer past the model, prompt beyond its context: likewise

    base_preset = "default" if args.with_stage2 else "stage1_only"
    stage2_knobs = {k: v for k, v in (("keep_ratio", args.keep_ratio), ("pruning_layer", args.pruning_layer)) if v is not None}
    try:
        pipe = Qwen25VLPruneVid(
            args.model_path, preset="baseline", num_frames=args.num_frames,
            device=args.device, attn_implementation=args.attn_implementation, _processor=processor,
        )  # fmt: skip
        grid = [
            (tau, ratio, segment)
            for tau in args.taus
            for ratio in args.cluster_ratios
            for segment in args.temporal_segment_ratios
        ]
        # every configuration is built (and so validated against the model) before the first generation
        settings = [
            pipe.with_config(base_preset, tau=tau, cluster_ratio=ratio, temporal_segment_ratio=segment, **stage2_knobs)
            for tau, ratio, segment in grid
        ]
    except (OSError, ValueError) as error:
        raise UserError(str(error).splitlines()[0]) from None

    for knob, values in (("tau", args.taus), ("cluster_ratio", args.cluster_ratios),
                         ("temporal_segment_ratio", args.temporal_segment_ratios)):  # fmt: skip
        low, high = RECOMMENDED[knob]
        outside = [v for v in values if not low <= v <= high]
        if outside:
            print(f"note: {knob} {', '.join(f'{v:g}' for v in outside)} outside the recommended {low:g}-{high:g}", file=sys.stderr)

    # counts settings: the warm-up, the baseline, then each grid point (each run --repeats times)
    progress = tqdm(total=len(grid) + 2, desc="setting (warm-up, baseline, grid)", unit="setting",
                    disable=args.no_progress, file=sys.stderr)  # fmt: skip
    warmup = pipe.generate_from_inputs(inputs, max_new_tokens=args.max_new_tokens)  # first-call allocations; not reported
    progress.update()
    baseline = run_setting(pipe, inputs, args, reference_ids=warmup["generated_ids"])
    progress.update()
    results = []
    for (tau, ratio, segment), setting in zip(grid, settings):
        progress.set_postfix(tau=tau, cluster=ratio, segment=segment)
        entry = {"tau": tau, "cluster_ratio": ratio, "temporal_segment_ratio": segment}
        entry.update(run_setting(setting, inputs, args, reference_ids=baseline["generated_ids"]))
        entry["ttft_speedup"] = baseline["ttft_s"] / entry["ttft_s"] if entry["ttft_s"] else None
        if args.with_stage2:
            entry["keep_ratio"], entry["pruning_layer"] = setting.config.keep_ratio, setting.config.pruning_layer
        results.append(entry)
        progress.update()
    progress.close()

    report = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["sweep_stage1.py", *argv]),
        "machine": machine_info(torch, pipe.device),
        "model_path": pipe.model_path,
        "video": str(video_path),
        "video_frames": video.total_frames,
        "sampled_frame_indices": video.indices,
        "question": args.question,
        "num_frames": args.num_frames,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "stages": "stage 1 + stage 2 + stage 3 (preset 'default')" if args.with_stage2 else "stage 1 only (preset 'stage1_only')",
        "grid": {"tau": list(args.taus), "cluster_ratio": list(args.cluster_ratios),
                 "temporal_segment_ratio": list(args.temporal_segment_ratios)},  # fmt: skip
        "num_settings": len(results),
        "baseline": baseline,
        "settings": results,
    }
    if args.model_path is None:
        report["note"] = (
            "embedded tiny model with random weights: token counts, compression and agreement are meaningful, "
            "the generated text is not; pass --model-path for real weights"
        )

    question = args.question if len(args.question) <= 160 else f"{args.question[:160]}... ({len(args.question)} characters)"
    print(f"video {video_path} ({video.total_frames} frames, {args.num_frames} sampled), question: {question!r}")
    print(f"{'tau':>5} {'cluster':>7} {'segment':>7} {'tokens: in -> stage 1 -> out':>28} {'segs':>4} {'static/dyn':>10} "
          f"{'compr':>6} {'TTFT s':>8} {'speedup':>7} {'agree':>6}")  # fmt: skip
    tokens = lambda e: f"{e['tokens_before_stage1']} -> {e['tokens_after_stage1']} -> {e['tokens_after']}"  # noqa: E731
    print(f"{'baseline':>21} {tokens(baseline):>28} {'-':>4} {'-':>10} "
          f"{0.0:>6.1%} {baseline['ttft_s']:>8.4f} {'1.00x':>7} {baseline['token_agreement']:>6.0%}")  # fmt: skip
    for e in results:
        split = (
            f"{e['static_tokens_after_stage1']}/{e['dynamic_tokens_after_stage1']}"
            if e["static_tokens_after_stage1"] is not None
            else "-"
        )
        segments = ",".join(map(str, e["num_segments"])) if e["num_segments"] else "-"
        print(
            f"{e['tau']:>5g} {e['cluster_ratio']:>7g} {e['temporal_segment_ratio']:>7g} "
            f"{tokens(e):>28} {segments:>4} {split:>10} "
            f"{e['total_compression']:>6.1%} {e['ttft_s']:>8.4f} {_ratio(e['ttft_speedup']):>7} {e['token_agreement']:>6.0%}"
        )
    write_json(args.output, report)
    print(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
