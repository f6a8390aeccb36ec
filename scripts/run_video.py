#!/usr/bin/env python
"""Answer a question about a video with PruneVid on Qwen2.5-VL (``make run-video``).

Default: the shipped video-QA model (``models/trained/video_qa``, the real architecture at toy size,
trained on ``data/video_qa.py``) answers the task's demo question about the demo video (a test
sample: 16 frames of 224 px), on CPU, in seconds, and says whether each answer is right. Without the
shipped model: the generated demo video on the embedded tiny Qwen2.5-VL with random weights. Real
weights on a GPU::

    python scripts/run_video.py clip.mp4 "What is the person doing?" \\
        --model-path Qwen/Qwen2.5-VL-7B-Instruct --preset default --compare --device cuda

``--compare`` also runs the ``baseline`` preset (the unpruned model, upstream code path) in the
same process on the same inputs and reports the agreement of the generated tokens and the ratios of
time to first token, decode speed, peak memory and KV-cache size, next to the analytic prefill FLOP
ratio of the language model. ``--stats-json PATH`` writes everything as JSON (only after every run
succeeded, through a temporary file renamed into place: bad input or Ctrl-C writes nothing).

Fail fast: every flag, the output path, the device, the video, the model's layer count (for
``--pruning-layer``) and the prompt's length against the model's context are checked before the
weights are loaded; a knob that the chosen preset ignores (``--keep-ratio`` with ``--preset
baseline``, ``--tau`` with ``--preset stage2_only``, ...) is an error, not a silent no-op. Each
problem is one line ``error: ...`` on stderr and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cli import (
    ArgumentParser,
    UserError,
    check_device,
    check_output_dir,
    check_output_file,
    check_video_path,
    check_video_prompt_against_model,
    configure_torch_threads,
    load_video_or_explain,
    run_cli,
    write_json,
)

DEFAULT_QUESTION = "What is moving in the video, and in which direction?"
KNOB_FLAGS = {
    "tau": "--tau", "cluster_ratio": "--cluster-ratio", "temporal_segment_ratio": "--temporal-segment-ratio",
    "keep_ratio": "--keep-ratio", "pruning_layer": "--pruning-layer", "selection": "--selection",
    "enable_cache_compression": "--no-cache-compression", "segmentation": "--segmentation",
    "cluster_count": "--cluster-count", "k_neighbors": "--k-neighbors",
}  # fmt: skip
STAGE1_FLAGS = ("tau", "cluster_ratio", "temporal_segment_ratio", "segmentation", "cluster_count", "k_neighbors")
STAGE2_FLAGS = ("keep_ratio", "pruning_layer", "selection", "enable_cache_compression")


def short(text: str, limit: int = 160) -> str:
    """``text`` for a one-line echo: at most ``limit`` characters (the JSON keeps the whole text)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def flag_error(error: ValueError) -> UserError:
    """A PruneVidConfig ``ValueError`` ("keep_ratio must be ...") as a UserError that names the flag."""
    message = str(error).splitlines()[0]
    field = message.split(" ", 1)[0].split("=", 1)[0]
    return UserError(f"{KNOB_FLAGS[field]}: {message}" if field in KNOB_FLAGS else message)


def parse_args(argv=None):
    from pruning.video.prunevid import CLUSTER_COUNTS, PRESET_NAMES, SEGMENTATIONS, SELECTION_MODES

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("video", nargs="?", type=Path, default=None, help="video file (default: the generated demo video)")
    p.add_argument("question", nargs="?", default=None,
                   help="default: the demo question (the trained model), or " + repr(DEFAULT_QUESTION))
    p.add_argument("-q", "--question", dest="question_option", default=None,
                   help="the question (same as the positional one; handy with the default demo video)")
    p.add_argument("--preset", default="default", help=f"one of {', '.join(PRESET_NAMES)} (default: default)")
    p.add_argument("--compare", action="store_true", help="also run the baseline in this process and compare")
    p.add_argument("--stats-json", type=Path, default=None, help="write the results as JSON to this path")
    p.add_argument("--visualize", type=Path, default=None, metavar="DIR",
                   help="write DIR/prunevid_tokens.png: the sampled frames with the token cells marked per stage")
    p.add_argument("--model-path", default=None, help="Qwen2.5-VL directory or hub id (default: the embedded tiny model)")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled uniformly from the video (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy decoding length (default 32)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--attn-implementation", default=None, choices=("sdpa", "eager"), help="default: the model's (sdpa)")
    p.add_argument("--verbose", action="store_true", help="log detection, shapes, importance and pruning statistics")
    p.add_argument(
        "--threads", type=int, default=None,
        help="CPU intra-op threads (default: 1 for the embedded tiny model on CPU, whose ops are too small to gain "
        "from threads; torch's default otherwise)",
    )  # fmt: skip
    g = p.add_argument_group("overrides of the preset's knobs (--preset custom = default + these)")
    g.add_argument("--tau", type=float, default=None)
    g.add_argument("--cluster-ratio", type=float, default=None)
    g.add_argument("--temporal-segment-ratio", type=float, default=None)
    g.add_argument("--keep-ratio", type=float, default=None)
    g.add_argument("--pruning-layer", type=int, default=None, help="default: the preset's layer 10 of 28, scaled to the model depth")
    g.add_argument("--selection", default=None, choices=SELECTION_MODES,
                   help="segment (default, as published): top keep-ratio per segment and frame; segment_ceil: the same "
                   "but every group keeps a token; global: top keep-ratio of all visual tokens")
    g.add_argument("--segmentation", default=None, choices=SEGMENTATIONS,
                   help="official (default, as published): DPC-KNN + refine_clusters; exact: exactly "
                   "round(T x ratio) segments")
    g.add_argument("--cluster-count", default=None, choices=CLUSTER_COUNTS,
                   help="official (default, as published): int(n x ratio), sets of <= 14 tokens kept; ceil: "
                   "ceil(n x ratio), always clustered")
    g.add_argument("--k-neighbors", type=int, default=None, help="k of DPC-KNN (default 7, as published)")
    g.add_argument("--no-cache-compression", action="store_true", help="stage 3 off (stage 2 still prunes)")
    args = p.parse_args(argv)
    if args.question_option is not None:
        args.question = args.question_option
    args.expected_answer = None
    from models.tiny.video_qa import SHIPPED_DIR

    if args.model_path is None and (SHIPPED_DIR / "config.json").is_file():  # the trained testbed and its demo
        args.model_path = str(SHIPPED_DIR)
        if args.video is None:
            from data.video_qa import demo_sample, demo_video_path

            args.video = demo_video_path()
            if args.question is None:
                args.question, args.expected_answer = demo_sample().question, demo_sample().answer
    if args.question is None:
        args.question = DEFAULT_QUESTION
    return args


def validate(args) -> dict:
    """Check every argument before any work is done; returns the knob overrides."""
    from pruning.video.prunevid import PRESET_NAMES, PruneVidConfig, preset

    if args.preset not in PRESET_NAMES:
        raise UserError(f"unknown --preset {args.preset!r}: choose one of {', '.join(PRESET_NAMES)}")
    if args.num_frames < 1:
        raise UserError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.question.strip():
        raise UserError("the question is empty: pass a question after the video path")
    check_video_path(args.video)
    check_output_file(args.stats_json, "--stats-json")
    check_output_dir(args.visualize, "--visualize")
    check_device(args.device)
    overrides = {
        name: getattr(args, name)
        for name in ("tau", "cluster_ratio", "temporal_segment_ratio", "keep_ratio", "pruning_layer", "selection",
                     "segmentation", "cluster_count", "k_neighbors")
        if getattr(args, name) is not None
    }
    if args.no_cache_compression:
        overrides["enable_cache_compression"] = False
    try:
        config = preset(args.preset, **{k: v for k, v in overrides.items() if k != "pruning_layer"})
        if "pruning_layer" in overrides:
            PruneVidConfig(pruning_layer=overrides["pruning_layer"])
    except ValueError as error:
        raise flag_error(error) from None
    # a knob for a stage the preset leaves off would be silently ignored: say so instead
    for stage, on, names, presets in (
        ("stage 1 (token merging)", config.enable_stage1, STAGE1_FLAGS, "stage1_only, default, conservative, aggressive"),
        ("stage 2 (attention pruning)", config.enable_pruning, STAGE2_FLAGS, "stage2_only, default, conservative, aggressive"),
    ):
        ignored = [KNOB_FLAGS[name] for name in names if name in overrides]
        if ignored and not on:
            raise UserError(
                f"{' / '.join(ignored)} would be ignored: --preset {args.preset} has {stage} off; use --preset custom "
                f"(default + your overrides) or a preset with {stage.split(' (')[0]} on ({presets})"
            )
    return overrides


def check_against_model(args, overrides: dict, video):
    """The model's config and processor (not its weights) against the flags; returns ``(processor, CPU inputs)``."""
    return check_video_prompt_against_model(args.model_path, video, args.question, args.max_new_tokens,
                                            overrides.get("pruning_layer"))


def layer_lengths(result: dict, num_layers: int) -> list[int]:
    """Tokens each decoder layer processes in prefill."""
    prompt = result["prompt_tokens"]
    after_stage1 = prompt - (result["tokens_before_stage1"] - result["tokens_after_stage1"])
    after_stage2 = after_stage1 - (result["tokens_before"] - result["tokens_after"])
    k = result["pruning_layer"]
    return [after_stage1 if k is None or i <= k else after_stage2 for i in range(num_layers)]


def verdict(answer: str, expected: str | None) -> str:
    """`` (right)`` / `` (wrong: the answer is X)`` for the demo question; nothing when the answer is unknown."""
    if expected is None:
        return ""
    from models.tiny.video_qa import normalize

    return " (right)" if normalize(answer) == normalize(expected) else f" (wrong: the answer is {expected!r})"


def summary(label: str, r: dict) -> str:
    tps = f"{r['decode_tokens_per_s']:.1f} tok/s" if r["decode_tokens_per_s"] else "- tok/s"
    return (
        f"{label:<14} visual tokens {r['tokens_before_stage1']} -> {r['tokens_after_stage1']} (stage 1) -> "
        f"{r['tokens_after']} (stage 2), compression {100 * r['total_compression_ratio']:.1f}%, "
        f"TTFT {r['ttft_s']:.3f} s, decode {tps}, KV {r['kv_cache_bytes'] / 1024:.1f} KiB, "
        f"peak mem {r['peak_memory_bytes'] / 2**20:.0f} MiB"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = validate(args)

    import torch
    from transformers.utils import logging as hf_logging

    from pipelines.prunevid import Qwen25VLPruneVid

    hf_logging.disable_progress_bar()  # no weight-loading bars: stdout/stderr carry the results and one-line errors
    configure_torch_threads(args.threads, args.model_path, args.device)
    # a bad video or too many frames, a layer past the model, a prompt beyond its context: fail before loading the weights
    video_path, video = load_video_or_explain(args.video, args.num_frames)
    processor, inputs = check_against_model(args, overrides, video)
    if args.compare and args.preset == "baseline":
        print("note: --compare with --preset baseline: the baseline is the run itself, nothing to compare", file=sys.stderr)
    try:
        pipe = Qwen25VLPruneVid(
            args.model_path,
            preset=args.preset,
            num_frames=args.num_frames,
            verbose=args.verbose,
            device=args.device,
            attn_implementation=args.attn_implementation,
            **overrides,
            _processor=processor,
        )
    except (OSError, ValueError) as error:
        raise UserError(str(error).splitlines()[0]) from None

    pipe.generate_from_inputs(inputs, max_new_tokens=1)  # warm-up (first-call allocations), not reported
    runs = {}
    if args.compare and args.preset != "baseline":
        runs["baseline"] = pipe.with_config("baseline").generate_from_inputs(inputs, max_new_tokens=args.max_new_tokens)
    runs[args.preset] = pipe.generate_from_inputs(inputs, max_new_tokens=args.max_new_tokens)
    result = runs[args.preset]

    from evaluation.flops import llm_prefill_flops

    text_config = pipe.model.config.get_text_config()
    flops = {name: llm_prefill_flops(text_config, layer_lengths(r, pipe.num_layers)) for name, r in runs.items()}
    stats = {
        "video": str(video_path),
        "question": args.question,
        "model_path": pipe.model_path,
        "device": str(pipe.device),
        "cpu_threads": torch.get_num_threads(),
        "num_frames": args.num_frames,
        "sampled_frame_indices": video.indices,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
        "llm_prefill_flops": flops,
    }
    if args.model_path is None:
        print("embedded tiny Qwen2.5-VL with random weights: its answers are meaningless text by design; read the "
              "token counts, timings and the agreement with the baseline (--model-path for real weights)")
    print(f"video {video_path} ({video.total_frames} frames, {args.num_frames} sampled), question: {short(args.question)!r}")
    if "baseline" in runs:
        base = runs["baseline"]
        a, b = base["generated_ids"], result["generated_ids"]
        same = sum(x == y for x, y in zip(a, b))
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
        stats["comparison"] = {
            "token_agreement": same / max(len(a), len(b), 1),
            "exact_match": a == b,
            "first_divergence": first_diff,
            "ttft_speedup": base["ttft_s"] / result["ttft_s"] if result["ttft_s"] else None,
            "decode_speedup": (
                result["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                if result["decode_tokens_per_s"] and base["decode_tokens_per_s"]
                else None
            ),
            "peak_memory_ratio": result["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] else None,
            "kv_cache_ratio": result["kv_cache_bytes"] / base["kv_cache_bytes"] if base["kv_cache_bytes"] else None,
            "llm_prefill_flops_ratio": flops[args.preset] / flops["baseline"],
        }
        print(summary("baseline", base))
        print(f"  answer: {base['generated_text']!r}{verdict(base['generated_text'], args.expected_answer)}")
    print(summary(args.preset, result))
    print(f"  answer: {result['generated_text']!r}{verdict(result['generated_text'], args.expected_answer)}")
    if args.expected_answer is not None:
        stats["expected_answer"] = args.expected_answer
    if "comparison" in stats:
        c = stats["comparison"]
        ratio = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        divergence = " (identical)" if c["exact_match"] else f", first divergence at token {c['first_divergence']}"
        print(
            f"agreement with baseline: {100 * c['token_agreement']:.0f}% of tokens{divergence}; "
            f"TTFT speedup {ratio(c['ttft_speedup'])}, decode speedup {ratio(c['decode_speedup'])}, "
            f"LLM prefill FLOPs {c['llm_prefill_flops_ratio']:.2f} of baseline, KV cache {c['kv_cache_ratio']:.2f}, "
            f"peak memory {c['peak_memory_ratio']:.2f} ({result['peak_memory_kind']})"
        )
    if args.visualize is not None:
        path = visualize(args.visualize, pipe, video, inputs)
        stats["visualization"] = str(path)
        print(f"token picture in {path}")
    if args.stats_json is not None:
        write_json(args.stats_json, stats)
        print(f"stats in {args.stats_json}")
    return 0


def visualize(directory: Path, pipe, video, inputs) -> Path:
    """``directory/prunevid_tokens.png`` of the last pruned run (frames, stage-1 static/dynamic and clusters, stage-2 kept)."""
    from evaluation.video_overlay import save_overlay, token_cell_masks
    from pruning.video.prunevid import merge_video_tokens, preset

    state = pipe.last_state
    t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
    merge = pipe.model.config.vision_config.spatial_merge_size
    grid = (t, h // merge, w // merge)
    if state is None:  # the baseline: nothing merged, nothing dropped
        import torch

        merged = merge_video_tokens(torch.zeros(grid[0], grid[1] * grid[2], 1), preset("baseline"))
        masks = token_cell_masks(merged, None, grid)
    else:
        masks = token_cell_masks(state.merges[0], state.kept_visual, grid)
    frames_per_step = pipe.model.config.vision_config.temporal_patch_size
    return save_overlay(Path(directory) / "prunevid_tokens.png", video.frames, masks, frames_per_step)


if __name__ == "__main__":
    run_cli(main)
