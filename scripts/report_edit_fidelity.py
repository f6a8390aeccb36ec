#!/usr/bin/env python
"""Fidelity of reference-token reuse against the baseline edit: PSNR / SSIM per mode and schedule.

Speed is measured by scripts/bench_edit.py (warm-up, repeats); this script reports quality
and the analytic FLOP bound only.

Runs the baseline once and every mode under every schedule from the same seed, including
the per-step ablation (4 steps: reuse on step 2 only, on step 4 only, on both, and refresh once),
on one image: your own with real weights, or by default the embedded trained testbed on its demo
test edit (128x128; PSNR against the known target too). ``scripts/eval_edit.py`` measures the same
on 100 held-out edits with standard errors and the alternatives. Real weights::

    HF_HUB_OFFLINE=0 python scripts/report_edit_fidelity.py --model-path Qwen/Qwen-Image-Edit \\
        --lora lightx2v/Qwen-Image-Lightning --lora-weight-name Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors \\
        -i photo.jpg -p "make the car red"
"""

from __future__ import annotations

import time
from pathlib import Path

import json
import math

from cli import (
    ArgumentParser,
    UserError,
    check_device,
    check_output_dir,
    load_edit_pipeline,
    check_edit_choice,
    resolve_edit_inputs,
    run_cli,
    write_outputs,
)
from pipelines.qwenimage_edit_limits import (
    EditInputError,
    LoRALoadError,
    check_lora_source,
    check_side,
    max_image_seq_len_of,
    output_size,
)

# label -> refresh steps (4 steps); other step counts get "alternate" and "once"
ABLATION_4_STEPS = {"reuse 2": "1,3,4", "reuse 4": "1,2,3", "reuse 2+4": "1,3", "reuse 2,3,4 (once)": "once"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", type=Path, default=None, help="reference image (default: the testbed's demo edit)")
    p.add_argument("-p", "--prompt", default=None, help="instruction (default: the demo edit's own)")
    p.add_argument("--edit-index", type=int, default=None, help="held-out test edit of the testbed, when no -i")
    p.add_argument("--reference-area", type=int, default=None,
                   help="px of area of the encoded reference (default: 128x128 for the testbed, else 1024x1024)")
    p.add_argument("-s", "--steps", type=int, default=4)
    p.add_argument("-c", "--cfg", type=float, default=1.0)
    p.add_argument("--modes", default="mlp,full,kv")
    p.add_argument("--model-path", default=None)
    p.add_argument("--lora-weight-name", default=None, help="file inside a LoRA repo, e.g. Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors")
    p.add_argument("--lora", default=None)
    p.add_argument("--height", type=int, default=None, help="a multiple of 16 px (default: the reference image's ~1 MP)")
    p.add_argument("--width", type=int, default=None, help="a multiple of 16 px; height x width <= 8192 tokens of 16x16 px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-offload", action="store_true")
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("-o", "--output_dir", type=Path, default=Path("outputs_fidelity"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # every input and output path before any work: one line, nothing written
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.cfg) or args.cfg < 1.0:
        raise UserError(f"--cfg must be a number >= 1.0 (1.0 disables true CFG), got {args.cfg}")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("mlp", "full", "kv")]
    if bad or not modes:
        raise UserError(f"unknown mode(s) {bad} in --modes; choose from mlp, full, kv")
    if args.input is not None and not args.input.is_file():
        raise UserError(f"input image {str(args.input)!r} does not exist")
    check_edit_choice(args)
    check_output_dir(args.output_dir, "-o/--output_dir")
    check_device(args.device, "--device")
    try:
        check_side(args.height, "--height", unset="unset")
        check_side(args.width, "--width", unset="unset")
        check_lora_source(args.lora, args.lora_weight_name, names=("--lora", "--lora-weight-name"))
    except (EditInputError, LoRALoadError) as error:
        raise UserError(str(error)) from None
    args.input = [args.input] if args.input is not None else None
    (image,), target, _ = resolve_edit_inputs(args, testbed=args.model_path is None)
    try:
        output_size(args.height, args.width, image.size, max_image_seq_len_of(args.model_path, args.lora),
                    names=("--height", "--width"), unset="unset", reference_area=args.reference_area)
    except EditInputError as error:
        raise UserError(str(error)) from None

    import torch
    from tqdm import tqdm

    from evaluation.flops import QwenImageShape, qwenimage_edit_flops_ratio
    from evaluation.metrics import psnr, ssim
    from pruning.edit.reference_reuse import resolve_refresh_steps

    try:
        pipe, model_path, device = load_edit_pipeline(args)
    except LoRALoadError as error:
        raise UserError(str(error)) from None
    pipe.set_progress_bar_config(disable=True)
    schedules = ABLATION_4_STEPS if args.steps == 4 else {"alternate": "alternate", "once": "once"}

    def edit(mode: str, refresh):
        try:
            result = pipe(image=image, prompt=args.prompt, num_inference_steps=args.steps, true_cfg_scale=args.cfg,
                          negative_prompt=" " if args.cfg > 1 else None, height=args.height, width=args.width,
                          generator=torch.Generator().manual_seed(args.seed), pruning_mode=mode,
                          refresh_steps=refresh, reference_area=args.reference_area).images[0]
        except EditInputError as error:  # a limit only the loaded pipeline knows (its scheduler, the prompt's length)
            raise UserError(str(error)) from None
        return result, dict(pipe.last_reuse_stats)

    baseline = edit("none", None)[0]
    rows, images = [], {}
    tokens = None
    runs = [(mode, label, sched) for label, sched in schedules.items() for mode in modes]
    for mode, label, sched in tqdm(runs, desc="modes x schedules"):
        out, stats = edit(mode, sched)
        tokens = stats["tokens"]
        refresh = resolve_refresh_steps(sched, args.steps)
        shape = QwenImageShape.from_transformer_config(pipe.transformer.config, tokens)
        rows.append(dict(mode=mode, schedule=label, refresh_steps=list(refresh), psnr_db=psnr(baseline, out),
                         ssim=ssim(baseline, out), cache_bytes=stats["cache_bytes"],
                         psnr_vs_target_db=psnr(out, target) if target is not None else None,
                         flops_ratio=qwenimage_edit_flops_ratio(shape, mode, refresh, args.steps)))
        images[f"{mode}_{sched.replace(',', '-')}.png"] = out

    # every run finished: all files or none (temporary names, renamed together)
    stats_path = args.output_dir / f"fidelity_{time.strftime('%Y%m%d_%H%M%S')}.json"
    stats = dict(model_path=model_path, lora=args.lora, steps=args.steps, cfg=args.cfg, prompt=args.prompt,
                 seed=args.seed, device=device, tokens=tokens, reference_area=args.reference_area, rows=rows,
                 baseline_psnr_vs_target_db=psnr(baseline, target) if target is not None else None)
    writers = {args.output_dir / name: (lambda tmp, out=out: out.save(tmp, format="PNG"))
               for name, out in {"baseline.png": baseline, **images}.items()}
    writers[stats_path] = lambda tmp: tmp.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    write_outputs(writers)
    print(f"\nmodel {model_path}, steps {args.steps}, tokens {tokens}, device {device}")
    if target is not None:
        print(f"PSNR against the target edit: baseline {stats['baseline_psnr_vs_target_db']:.2f} dB")
    print(f"{'mode':<5} {'schedule':<20} {'refresh':<8} {'PSNR dB':>8} {'SSIM':>7} {'FLOP bound':>10}"
          + (f" {'vs target':>10}" if target is not None else ""))
    for r in rows:
        print(f"{r['mode']:<5} {r['schedule']:<20} {','.join(map(str, r['refresh_steps'])):<8} {r['psnr_db']:>8.2f} "
              f"{r['ssim']:>7.4f} {1 / r['flops_ratio']:>9.2f}x"
              + (f" {r['psnr_vs_target_db']:>10.2f}" if target is not None else ""))
    print(f"images in {args.output_dir}/, stats in {stats_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
