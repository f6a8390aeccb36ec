#!/usr/bin/env python
"""Train the embedded Qwen-Image-Edit testbed on the generated edit task (the model system A's quality is measured on).

Three stages (``models/tiny/edit_testbed.py`` says what each trains and why), each resumable, each writing its
JSON log beside its checkpoint under ``--work-dir``:

* ``vae``: the toy ``AutoencoderKLQwenImage`` reconstructs the task's 128x128 images (validation PSNR logged);
* ``transformer``: the toy ``QwenImageTransformer2DModel`` learns the edits by flow matching on the stock
  pipeline's own inputs, for 4-step sampling (validation PSNR against the target, per edit type, and recolour
  accuracy logged);
* ``zero_cond_t``: the Qwen-Image-Edit-2511 variant (``zero_cond_t=True``: reference tokens modulated at t = 0),
  fine-tuned from the trained transformer for ``--zero-cond-t-steps`` steps (one model cannot serve both: the
  flag changes every block's modulation of the reference tokens);
* ``assemble``: the trained components and the seeded toy text encoder as one diffusers directory
  (``--output-dir``, default ``models/trained/qwenimage_edit``) that ``from_pretrained`` loads.

    python scripts/train_edit_base.py --stage vae            # make train-edit-base runs all four
    python scripts/train_edit_base.py --stage transformer --resume
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import ArgumentParser, UserError, check_output_dir, check_output_file, run_cli, set_torch_threads

STAGES = ("vae", "transformer", "zero_cond_t", "assemble", "all")


def parse_args(argv=None):
    from models.tiny.edit_testbed import SHARED_DEFAULTS, SHIPPED_DIR, TRANSFORMER_DEFAULTS, VAE_DEFAULTS, WORK_DIR

    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--work-dir", type=Path, default=WORK_DIR, help=f"checkpoints, logs, trained stages (default: {WORK_DIR})")
    p.add_argument("--output-dir", type=Path, default=SHIPPED_DIR, help=f"the assembled pipeline (default: {SHIPPED_DIR})")
    p.add_argument("--resume", action="store_true", help="continue the stage's checkpoint in --work-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint or output")
    p.add_argument("--zero-cond-t-steps", type=int, default=1000, help="fine-tuning steps of the zero_cond_t stage")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    for key, value in {**VAE_DEFAULTS, **TRANSFORMER_DEFAULTS, **SHARED_DEFAULTS}.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    return p.parse_args(argv)


def validate(args) -> None:
    from models.tiny.edit_testbed import SHARED_DEFAULTS, TRANSFORMER_DEFAULTS, VAE_DEFAULTS

    for key, default in {**VAE_DEFAULTS, **TRANSFORMER_DEFAULTS, **SHARED_DEFAULTS}.items():
        value = getattr(args, key)
        low = 0 if key in ("seed", "warmup", "weight_decay", "latent_noise", "latent_penalty", "thumbnail_weight", "lightning_fraction", "edit_weight", "clip") else (
            1 if isinstance(default, int) else 0.0)
        if not value >= low or (isinstance(default, float) and key.endswith("lr") and not value > 0):
            raise UserError(f"--{key.replace('_', '-')} must be {'> 0' if key.endswith('lr') else f'>= {low}'}, got {value}")
    if args.lightning_fraction > 1:
        raise UserError(f"--lightning-fraction must be in [0, 1], got {args.lightning_fraction}")
    if args.vae_base_dim % 4:
        raise UserError(f"--vae-base-dim must be a multiple of 4, got {args.vae_base_dim}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.zero_cond_t_steps < 1:
        raise UserError(f"--zero-cond-t-steps must be >= 1, got {args.zero_cond_t_steps}")
    check_output_dir(args.work_dir, "--work-dir")
    check_output_dir(args.output_dir, "--output-dir")


def stage_paths(args) -> dict[str, Path]:
    from models.tiny.edit_testbed import ZERO_COND_T_SUBFOLDER

    work = args.work_dir
    return {"vae": work / "vae", "vae_checkpoint": work / "vae_checkpoint.pt",
            "transformer": work / "transformer", "transformer_checkpoint": work / "transformer_checkpoint.pt",
            "zero_cond_t": work / ZERO_COND_T_SUBFOLDER, "zero_cond_t_checkpoint": work / f"{ZERO_COND_T_SUBFOLDER}_checkpoint.pt",
            "cache": work / "encoded_edits.pt"}


def check_stage(args, output: Path, checkpoint: Path, name: str) -> None:
    check_output_file(checkpoint, "--work-dir")
    if args.resume and not checkpoint.is_file():
        raise UserError(f"--resume: no {name} checkpoint at {str(checkpoint)!r}")
    if not args.resume and checkpoint.exists() and not args.overwrite:
        raise UserError(f"{name} checkpoint {str(checkpoint)!r} exists: pass --resume to continue it or --overwrite")
    if output.exists() and any(output.iterdir()) and not args.overwrite and not args.resume:
        raise UserError(f"trained {name} {str(output)!r} exists: pass --overwrite to retrain it")


def main(argv=None) -> int:
    args = parse_args(argv)
    validate(args)
    paths = stage_paths(args)
    stages = ("vae", "transformer", "zero_cond_t", "assemble") if args.stage == "all" else (args.stage,)
    if "vae" in stages:
        check_stage(args, paths["vae"], paths["vae_checkpoint"], "vae")
    for stage in ("transformer", "zero_cond_t"):
        if stage in stages:
            check_stage(args, paths[stage], paths[f"{stage}_checkpoint"], stage)
    for stage, needs in (("transformer", "vae"), ("zero_cond_t", "transformer"), ("assemble", "transformer")):
        if stage in stages and needs not in stages and not (paths[needs] / "config.json").is_file():
            raise UserError(f"no trained {needs} in {str(paths[needs])!r}: run --stage {needs} first")
    if "assemble" in stages and args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite:
        raise UserError(f"--output-dir {str(args.output_dir)!r} is not empty: pass --overwrite to replace it")
    set_torch_threads(args.threads)
    from models.tiny import edit_testbed

    if "vae" in stages:
        record = edit_testbed.train_vae(paths["vae"], checkpoint=paths["vae_checkpoint"], resume=args.resume,
                                        **{k: getattr(args, k) for k in (*edit_testbed.VAE_DEFAULTS, *edit_testbed.SHARED_DEFAULTS)})
        print(f"VAE: validation PSNR {record['validation_psnr']:.2f} dB ({record['train_seconds']:.0f} s); saved to {paths['vae']}")
    settings = {k: getattr(args, k) for k in (*edit_testbed.TRANSFORMER_DEFAULTS, *edit_testbed.SHARED_DEFAULTS)}
    for stage in ("transformer", "zero_cond_t"):
        if stage not in stages:
            continue
        zero_cond_t = stage == "zero_cond_t"
        extra = dict(zero_cond_t=True, init_from=paths["transformer"], steps=args.zero_cond_t_steps,
                     warmup=min(args.warmup, args.zero_cond_t_steps // 10)) if zero_cond_t else {}
        record = edit_testbed.train_transformer(
            paths[stage], vae_dir=paths["vae"], cache=paths["cache"], checkpoint=paths[f"{stage}_checkpoint"],
            resume=args.resume, **{**settings, **extra})
        print(f"{stage}: validation PSNR vs target {record['validation_psnr']:.2f} dB ({record['train_seconds']:.0f} s); "
              f"saved to {paths[stage]}")
    if "assemble" in stages:
        edit_testbed.assemble(args.work_dir, args.output_dir)
        print(f"assembled pipeline saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
