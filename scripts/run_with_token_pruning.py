#!/usr/bin/env python
"""Edit an image with Qwen-Image-Edit, reusing reference-token states across steps (``make run-edit``).

Default: the embedded tiny model and a generated sample image, so it runs on a fresh CPU
machine. Real weights::

    HF_HUB_OFFLINE=0 python scripts/run_with_token_pruning.py --model-path Qwen/Qwen-Image-Edit \\
        --lora lightx2v/Qwen-Image-Lightning --lora-weight-name Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors \\
        -i photo.jpg -p "make the car red" --compare

Writes into ``--output_dir``: ``output_pruning_<timestamp>.png``, ``latest_pruning.png``,
``latest_baseline.png`` (with ``--compare`` or ``--no-pruning``) and the stats JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from cli import ArgumentParser, ModuleTimer, UserError, load_edit_pipeline, load_reference_image, run_cli, stopwatch, write_json

MODES = ("none", "mlp", "full", "kv")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", type=Path, default=None, help="reference image (default: a generated sample)")
    p.add_argument("-p", "--prompt", default="Change the red circle to blue and add a yellow star.")
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
    p.add_argument("--height", type=int, default=None, help="output height (default: the stock pipeline's ~1 MP)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also run the baseline from the same seed: time, PSNR, SSIM")
    p.add_argument("--stats-json", type=Path, default=None, help="default: <output_dir>/stats_<timestamp>.json")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (small GPUs)")
    p.add_argument("--vae-tiling", action="store_true", help="enable VAE tiling (small GPUs)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def validate(args) -> tuple[str, tuple[int, ...]]:
    """Check every argument before any work is done; nothing is written on bad input."""
    from pruning.edit.reference_reuse import resolve_refresh_steps

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.cfg < 1.0:
        raise UserError(f"--cfg must be >= 1.0 (1.0 disables true CFG), got {args.cfg}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 32:
            raise UserError(f"--{name} must be >= 32 pixels, got {value}")
    mode = "none" if args.no_pruning else args.pruning_mode
    try:
        refresh = resolve_refresh_steps(args.refresh_steps, args.steps)
    except ValueError as error:
        raise UserError(f"--refresh-steps: {error}") from None
    if args.input is not None:
        if not args.input.is_file():
            raise UserError(f"input image {str(args.input)!r} does not exist: pass an existing image file with -i")
    return mode, refresh


def main(argv=None) -> int:
    args = parse_args(argv)
    mode, refresh = validate(args)
    image = load_reference_image(args.input)

    import torch

    from evaluation.flops import QwenImageShape, qwenimage_edit_flops_ratio
    from evaluation.metrics import psnr, ssim

    pipe, model_path, device = load_edit_pipeline(args)
    timer = ModuleTimer(pipe.transformer)

    def edit(pruning_mode: str):
        timer.reset()
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        with stopwatch() as total:
            result = pipe(
                image=image,
                prompt=args.prompt,
                negative_prompt=args.negative_prompt if args.cfg > 1.0 else None,
                true_cfg_scale=args.cfg,
                num_inference_steps=args.steps,
                height=args.height,
                width=args.width,
                generator=generator,
                pruning_mode=pruning_mode,
                refresh_steps=list(refresh),
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
    stats_any = main_run[3]
    tokens = stats_any.get("tokens") or {}
    out_image = main_run[0]
    width, height = out_image.size
    stats = {
        "mode": mode,
        "refresh_steps": list(refresh) if mode != "none" else list(range(1, args.steps + 1)),
        "steps": args.steps,
        "cfg": args.cfg,
        "height": height,
        "width": width,
        "seed": args.seed,
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

    # every run finished: only now write anything
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if "baseline" in runs:
        runs["baseline"][0].save(args.output_dir / "latest_baseline.png")
    if "pruning" in runs:
        runs["pruning"][0].save(args.output_dir / f"output_pruning_{stamp}.png")
        runs["pruning"][0].save(args.output_dir / "latest_pruning.png")
    stats_path = args.stats_json or args.output_dir / f"stats_{stamp}.json"
    write_json(stats_path, stats)

    for label, key in (("baseline", "time_baseline_s"), (f"pruning ({mode})", "time_pruned_s")):
        if stats[key] is not None:
            print(f"denoising time, {label}: {stats[key]:.2f} s")
    if stats["speedup"] is not None:
        print(
            f"speedup {stats['speedup']:.2f}x (analytic FLOP bound {1 / stats['flops_ratio']:.2f}x), "
            f"PSNR {stats['psnr_db']:.2f} dB, SSIM {stats['ssim']:.4f}, cache {stats['cache_bytes'] / 2**20:.1f} MiB"
        )
    if args.model_path is None:
        print("embedded tiny Qwen-Image-Edit with random weights: the images are noise by design; "
              "read the times, PSNR/SSIM against the baseline and the FLOP ratio (--model-path for real weights)")
    print(f"images in {args.output_dir}/, stats in {stats_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
