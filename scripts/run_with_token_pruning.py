#!/usr/bin/env python
"""Edit an image with Qwen-Image-Edit, reusing reference-token states across steps (``make run-edit``).

Default: the embedded trained testbed (``models/trained/qwenimage_edit``: a toy Qwen-Image-Edit trained on the
generated edit task of ``data/edit_task.py``) on a held-out test edit, so it runs on a fresh CPU machine and the
edit can be checked: the strip ``compare_strip.png`` (with ``--compare``) shows input | baseline | reuse |
amplified difference | target, and the stats JSON holds PSNR / SSIM against the target next to those against the
baseline. ``--edit-index N`` picks another test edit; ``-i`` / ``-p`` your own image and instruction (the testbed
knows only the task's instructions). The testbed edits at 128x128 with the reference encoded at 128x128
(``--reference-area``; upstream's 1024x1024 for real weights). Real weights::

    HF_HUB_OFFLINE=0 python scripts/run_with_token_pruning.py --model-path Qwen/Qwen-Image-Edit \\
        --lora lightx2v/Qwen-Image-Lightning --lora-weight-name Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors \\
        -i photo.jpg -p "make the car red" --compare

Qwen-Image-Edit-2509 / 2511 (``QwenImageEditPlusPipeline``, picked from the model's ``model_index.json``) take
one or several reference images, one ``-i`` each; ``--pipeline plus`` selects the embedded tiny Plus pipeline.

Writes into ``--output_dir``: ``output_pruning_<timestamp>.png``, ``latest_pruning.png``,
``latest_baseline.png`` (with ``--compare`` or ``--no-pruning``) and the stats JSON.

Every input and output path is checked before the model is loaded (a bad one: one ``error:`` line,
exit 2, nothing written). The files are written only after every run succeeded, all through
temporary names renamed into place together: Ctrl-C (exit 130) never leaves a half-written file or
images without their stats. Sizes: multiples of 16 px, at most the scheduler's ``max_image_seq_len``
(8192 tokens of 16x16 px for Qwen-Image-Edit, e.g. 1024x2048); a prompt beyond
``--max-sequence-length`` tokens is truncated with a warning.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from cli import (
    ArgumentParser,
    ModuleTimer,
    UserError,
    check_device,
    check_output_dir,
    check_output_file,
    edit_pipeline_choice,
    load_edit_pipeline,
    check_edit_choice,
    resolve_edit_inputs,
    run_cli,
    stopwatch,
    write_outputs,
)
from pipelines.qwenimage_edit_limits import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    EditInputError,
    LoRALoadError,
    check_lora_source,
    check_max_sequence_length,
    check_side,
    max_image_seq_len_of,
    output_size,
)

MODES = ("none", "mlp", "full", "kv")
DIFFERENCE_GAIN = 8
"""The strip's difference panel: |baseline - reuse| per pixel, times this, so small differences are visible."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", type=Path, action="append", default=None,
                   help="reference image; repeat for several (Edit-2509 / 2511); default: a generated sample")
    p.add_argument("--pipeline", default="auto", choices=("auto", "edit", "plus"),
                   help="auto: the class the model's model_index.json names (embedded model: edit for one -i image, "
                        "plus for several); edit: QwenImageEditPipeline; plus: QwenImageEditPlusPipeline (2509 / 2511)")
    p.add_argument("-p", "--prompt", default=None,
                   help="the instruction (default: the test edit's own; with -i: a recolour instruction)")
    p.add_argument("--edit-index", type=int, default=None,
                   help="which held-out test edit of the generated task to run when no -i is given (default: the demo edit, "
                        "models.tiny.edit_testbed.DEMO_EDIT_INDEX)")
    p.add_argument("--reference-area", type=int, default=None,
                   help="px of area at which each reference image is VAE-encoded (default: 128x128 for the embedded "
                        "testbed, upstream's 1024x1024 = 1048576 for --model-path; 512x512 = a quarter of the tokens)")
    p.add_argument("-o", "--output_dir", type=Path, default=Path("outputs_pruning"))
    p.add_argument("-s", "--steps", type=int, default=4, help="denoising steps (4 with the Lightning LoRA)")
    p.add_argument("-c", "--cfg", type=float, default=1.0, help="true CFG scale (1.0: no negative branch)")
    p.add_argument("--negative-prompt", default=" ", help="used only when --cfg > 1")
    p.add_argument("--no-pruning", action="store_true", help="run the baseline only")
    p.add_argument("--pruning-mode", default="full", choices=MODES)
    p.add_argument("--refresh-steps", default=None, help="'alternate' (default: 1,3,...), 'once', 'all' or e.g. '1,3'")
    p.add_argument("--model-path", default=None, help="diffusers-format Qwen-Image-Edit dir or hub id (default: embedded tiny)")
    p.add_argument("--lora-weight-name", default=None, help="file inside a LoRA repo, e.g. Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors")
    p.add_argument("--lora", default=None, help="Lightning LoRA path or hub id (switches to the Lightning scheduler)")
    p.add_argument("--height", type=int, default=None,
                   help="output height, a multiple of 16 px (default: the reference image's aspect ratio at ~1 MP); "
                        "height x width at most the scheduler's max_image_seq_len tokens of 16x16 px (8192)")
    p.add_argument("--width", type=int, default=None, help="output width, a multiple of 16 px (see --height)")
    p.add_argument("--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH,
                   help="prompt tokens kept (1..1024); a longer prompt is truncated with a warning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also run the baseline from the same seed: time, PSNR, SSIM")
    p.add_argument("--stats-json", type=Path, default=None, help="default: <output_dir>/stats_<timestamp>.json")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (small GPUs)")
    p.add_argument("--vae-tiling", action="store_true", help="enable VAE tiling (small GPUs)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def validate(args) -> tuple[str, tuple[int, ...]]:
    """Check every argument and output path before any work; nothing is written on bad input.

    What needs the reference image (the output size it implies) is checked in :func:`check_size`.
    """
    from pruning.edit.reference_reuse import resolve_refresh_steps

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.cfg) or args.cfg < 1.0:
        raise UserError(f"--cfg must be a number >= 1.0 (1.0 disables true CFG), got {args.cfg}")
    try:
        check_side(args.height, "--height", unset="unset")
        check_side(args.width, "--width", unset="unset")
        check_max_sequence_length(args.max_sequence_length, "--max-sequence-length")
    except EditInputError as error:
        raise UserError(str(error)) from None
    mode = "none" if args.no_pruning else args.pruning_mode
    try:
        refresh = resolve_refresh_steps(args.refresh_steps, args.steps)
    except ValueError as error:
        raise UserError(f"--refresh-steps: {error}") from None
    check_edit_choice(args)
    for path in args.input or []:
        if not path.is_file():
            raise UserError(f"input image {str(path)!r} does not exist: pass an existing image file with -i")
    if args.input and len(args.input) > 1 and args.pipeline == "edit":
        raise UserError(f"--pipeline edit takes one -i image, got {len(args.input)}: Qwen-Image-Edit-2509 / 2511 "
                        "(--pipeline plus) take several")
    check_output_dir(args.output_dir, "-o/--output_dir")
    check_output_file(args.stats_json, "--stats-json")
    check_device(args.device, "--device")
    try:
        check_lora_source(args.lora, args.lora_weight_name, names=("--lora", "--lora-weight-name"))
    except LoRALoadError as error:
        raise UserError(str(error)) from None
    return mode, refresh


def check_size(args, image) -> None:
    """``--height``/``--width`` (or the size the last reference image implies) within the pipeline's limits."""
    try:
        output_size(args.height, args.width, image.size, max_image_seq_len_of(args.model_path, args.lora),
                    names=("--height", "--width"), unset="unset", reference_area=args.reference_area)
    except EditInputError as error:
        raise UserError(str(error)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    mode, refresh = validate(args)
    pipeline_class, _ = edit_pipeline_choice(args)  # reads model_index.json only: fails before any weights load
    testbed = args.model_path is None and pipeline_class.stock_class.__name__ == "QwenImageEditPipeline"
    images, target, sample = resolve_edit_inputs(args, testbed)
    check_size(args, images[-1])

    import torch

    from evaluation.flops import QwenImageShape, qwenimage_edit_flops_ratio
    from evaluation.metrics import psnr, ssim

    try:
        pipe, model_path, device = load_edit_pipeline(args)
    except LoRALoadError as error:  # the model loaded; the LoRA did not (load_edit_pipeline explains only the model)
        raise UserError(str(error)) from None
    timer = ModuleTimer(pipe.transformer)

    def edit(pruning_mode: str):
        timer.reset()
        pipe.set_progress_bar_config(desc=f"denoise ({'baseline' if pruning_mode == 'none' else pruning_mode})", unit="step")
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        with stopwatch() as total, explained_limits():
            result = pipe(
                image=images if len(images) > 1 else images[0],
                prompt=args.prompt,
                negative_prompt=args.negative_prompt if args.cfg > 1.0 else None,
                true_cfg_scale=args.cfg,
                num_inference_steps=args.steps,
                height=args.height,
                width=args.width,
                generator=generator,
                pruning_mode=pruning_mode,
                refresh_steps=list(refresh),
                reference_area=args.reference_area,
                max_sequence_length=args.max_sequence_length,
            ).images[0]
        return result, timer.seconds, total["seconds"], dict(pipe.last_reuse_stats)

    runs = {}
    if args.compare or mode == "none":
        runs["baseline"] = edit("none")
    if mode != "none":
        runs["pruning"] = edit(mode)
    timer.remove()

    # the pruned run when there is one, else the baseline (no eager runs["baseline"]: it may not exist)
    main_run = runs["pruning"] if "pruning" in runs else runs["baseline"]
    if target is not None and target.size != main_run[0].size:  # another --height / --width: no pixel-wise target
        target = None
    stats_any = main_run[3]
    tokens = stats_any.get("tokens") or {}
    out_image = main_run[0]
    width, height = out_image.size
    stats = {
        "mode": mode,
        "pipeline": type(pipe).__name__,
        "references": len(images),
        "refresh_steps": list(refresh) if mode != "none" else list(range(1, args.steps + 1)),
        "steps": args.steps,
        "cfg": args.cfg,
        "height": height,
        "width": width,
        "seed": args.seed,
        "prompt": args.prompt,
        "reference_area": args.reference_area,
        "test_edit": None if sample is None else {"split": "test", "index": sample.index, "type": sample.edit_type},
        "model_path": model_path,
        "lora": args.lora,
        "device": device,
        "tokens": tokens,
        "time_baseline_s": runs["baseline"][1] if "baseline" in runs else None,
        "time_pruned_s": runs["pruning"][1] if "pruning" in runs else None,
        "total_time_baseline_s": runs["baseline"][2] if "baseline" in runs else None,
        "total_time_pruned_s": runs["pruning"][2] if "pruning" in runs else None,
        "speedup": None,
        "psnr_db": None,
        "ssim": None,
        "cache_bytes": stats_any.get("cache_bytes", 0),
        "flops_ratio": None,
    }
    if tokens and mode != "none":
        shape = QwenImageShape.from_transformer_config(pipe.transformer.config, tokens)
        stats["flops_ratio"] = qwenimage_edit_flops_ratio(shape, mode, refresh, args.steps)
    if "baseline" in runs and "pruning" in runs:
        stats["speedup"] = runs["baseline"][1] / runs["pruning"][1]
        stats["psnr_db"] = psnr(runs["baseline"][0], runs["pruning"][0])
        stats["ssim"] = ssim(runs["baseline"][0], runs["pruning"][0])
    if target is not None:
        for name, run in runs.items():
            stats[f"psnr_vs_target_{name}_db"] = psnr(run[0], target)
            stats[f"ssim_vs_target_{name}"] = ssim(run[0], target)
        stats["psnr_vs_target_input_db"] = psnr(images[0], target)
    if target is not None and sample.edit_type == "recolour":
        from data.edit_task import mask_colour

        for name, run in runs.items():
            stats[f"colour_{name}"] = mask_colour(run[0], sample.asked_mask())
        stats["colour_asked"] = sample.new_colour

    # every run finished: only now write anything, all files or none (temporary names, renamed together)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    stats_path = args.stats_json or args.output_dir / f"stats_{stamp}.json"
    writers = {}
    if "baseline" in runs:
        writers[args.output_dir / "latest_baseline.png"] = png_writer(runs["baseline"][0])
    if "pruning" in runs:
        writers[args.output_dir / f"output_pruning_{stamp}.png"] = png_writer(runs["pruning"][0])
        writers[args.output_dir / "latest_pruning.png"] = png_writer(runs["pruning"][0])
    if args.compare and "pruning" in runs:
        strip = compare_strip(images[-1], runs["baseline"][0], runs["pruning"][0], target)
        writers[args.output_dir / "compare_strip.png"] = png_writer(strip)
    writers[stats_path] = lambda tmp: tmp.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    write_outputs(writers)

    for label, key in (("baseline", "time_baseline_s"), (f"pruning ({mode})", "time_pruned_s")):
        if stats[key] is not None:
            print(f"denoising time, {label}: {stats[key]:.2f} s")
    if stats["speedup"] is not None:
        print(
            f"speedup {stats['speedup']:.2f}x (analytic FLOP bound {1 / stats['flops_ratio']:.2f}x), "
            f"PSNR {stats['psnr_db']:.2f} dB, SSIM {stats['ssim']:.4f}, cache {stats['cache_bytes'] / 2**20:.1f} MiB"
        )
    if target is not None:
        print("against the target edit: PSNR " + ", ".join(
            f"{name} {stats[f'psnr_vs_target_{name}_db']:.2f} dB" for name in runs)
            + f" (the input unchanged: {stats['psnr_vs_target_input_db']:.2f} dB)")
    if "colour_asked" in stats:
        print(f"recolour asked for {stats['colour_asked']}: " + ", ".join(f"{name} made it {stats[f'colour_{name}']}"
                                                                          for name in runs))
    if testbed:
        print(f"embedded testbed trained on the generated edit task: {args.prompt!r}"
              + ("" if sample is None else f" (test edit {sample.index}, {sample.edit_type})")
              + ("; the strip is compare_strip.png" if args.compare and "pruning" in runs else ""))
    elif args.model_path is None:
        print(f"embedded tiny {type(pipe).stock_class.__name__} with random weights: the images are noise by design; "
              "read the times, PSNR/SSIM against the baseline and the FLOP ratio (--model-path for real weights)")
    print(f"images in {args.output_dir}/, stats in {stats_path}")
    return 0


def compare_strip(reference, baseline, pruned, target=None):
    """One image: input | baseline | reuse | amplified difference (``DIFFERENCE_GAIN`` x |baseline - reuse|) | target
    (when known), each resized to the output's size, 4 px apart, a label above each."""
    import numpy as np
    from PIL import Image, ImageDraw

    size = baseline.size
    difference = np.abs(np.asarray(baseline, dtype=np.int16) - np.asarray(pruned, dtype=np.int16)) * DIFFERENCE_GAIN
    panels = [("input", reference.convert("RGB").resize(size)), ("baseline", baseline), ("reuse", pruned),
              (f"|diff| x{DIFFERENCE_GAIN}", Image.fromarray(difference.clip(0, 255).astype(np.uint8)))]
    if target is not None:
        panels.append(("target", target.resize(size)))
    gap, label = 4, 14
    strip = Image.new("RGB", (len(panels) * (size[0] + gap) - gap, size[1] + label), "white")
    draw = ImageDraw.Draw(strip)
    for i, (name, panel) in enumerate(panels):
        x = i * (size[0] + gap)
        strip.paste(panel, (x, label))
        draw.text((x + 2, 1), name, fill="black")
    return strip


def png_writer(image):
    return lambda tmp: image.save(tmp, format="PNG")


@contextmanager
def explained_limits():
    """A limit that only the loaded pipeline can check (its own scheduler, the prompt's RoPE length): one line."""
    try:
        yield
    except EditInputError as error:
        raise UserError(str(error)) from None


if __name__ == "__main__":
    run_cli(main)
