#!/usr/bin/env python
"""Train the embedded video-QA Qwen2.5-VL from scratch on the generated task (the model system B is measured on).

The model is the real Qwen2.5-VL architecture at toy size (``models/tiny/video_qa.py``: windowed ViT
with full-attention blocks, 2x2 merger, M-RoPE, GQA), trained on a deterministic stream of
``data/video_qa.py`` samples (16 frames of 224x224 px = 512 visual tokens, six question types) with
the answer's cross-entropy plus auxiliary supervision (``models/tiny/video_qa.py`` says what and why):
per-token probes (``--aux-weight``), attention supervision of the question's key words and of the
answer's evidence tokens (``--attention-weight``), and the answer read out one layer early
(``--readout-weight``). AdamW, linear warm-up then cosine decay, gradient clipping. Every ``--eval-every`` steps: greedy
exact-match accuracy per question type on the validation split, written to the JSON log next to the
checkpoint, and a checkpoint (``--resume`` continues from it, on exactly the samples the uninterrupted
run would have seen).

    python scripts/train_video_base.py                      # make train-video-base: into models/trained/video_qa
    python scripts/train_video_base.py --steps 20 --output-dir /tmp/vqa --checkpoint /tmp/vqa.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import ArgumentParser, UserError, check_output_dir, check_output_file, run_cli, set_torch_threads

MINIMUMS = dict(steps=1, batch_size=1, turns=1, warmup=0, weight_decay=0.0, aux_weight=0.0, motion_weight=0.0, attention_weight=0.0, readout_weight=0.0, value_weight=0.0, clip=0.0, embed_std=0.0,
                qk_std=0.0, seed=0, eval_size=1,
                eval_every=1, text_hidden=32, text_layers=1, vision_hidden=16)


def parse_args(argv=None):
    from models.tiny.video_qa import DEFAULTS, SHIPPED_DIR

    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=SHIPPED_DIR, help=f"default: {SHIPPED_DIR}")
    p.add_argument("--checkpoint", type=Path, default=Path("runs/video_base/checkpoint.pt"),
                   help="checkpoint written at every evaluation (its JSON log beside it)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir when training ends")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of this trained directory (same sizes) instead of a seeded init")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    return p.parse_args(argv)


def validate(args) -> None:
    for key, low in MINIMUMS.items():
        value = getattr(args, key)
        if not value >= low:
            raise UserError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.text_hidden % 32:
        raise UserError(f"--text-hidden must be a multiple of 32 (head dim 32), got {args.text_hidden}")
    if args.vision_hidden % 16:
        raise UserError(f"--vision-hidden must be a multiple of 16 (head dim 16), got {args.vision_hidden}")
    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        raise UserError(f"--init-from: no trained model (config.json) in {str(args.init_from)!r}")
    if args.init_from is not None:
        import json

        config = json.loads((args.init_from / "config.json").read_text())
        sizes = (config["text_config"]["hidden_size"], config["text_config"]["num_hidden_layers"],
                 config["vision_config"]["hidden_size"])
        if sizes != (args.text_hidden, args.text_layers, args.vision_hidden):
            raise UserError(f"--init-from: {str(args.init_from)!r} is text {sizes[0]} x {sizes[1]} layers, vision "
                            f"{sizes[2]}; pass the same --text-hidden / --text-layers / --vision-hidden")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_output_dir(args.output_dir, "--output-dir")
    check_output_file(args.checkpoint, "--checkpoint")
    if args.resume and not args.checkpoint.is_file():
        raise UserError(f"--resume: no checkpoint at {str(args.checkpoint)!r}")
    if not args.resume and args.checkpoint.exists() and not args.overwrite:
        raise UserError(f"--checkpoint {str(args.checkpoint)!r} exists: pass --resume to continue it or --overwrite")
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite:
        raise UserError(f"--output-dir {str(args.output_dir)!r} is not empty: pass --overwrite to replace it")


def main(argv=None) -> int:
    args = parse_args(argv)
    validate(args)
    set_torch_threads(args.threads)
    from models.tiny.video_qa import DEFAULTS, train

    record = train(args.output_dir, checkpoint=args.checkpoint, resume=args.resume, init_from=args.init_from,
                   **{key: getattr(args, key) for key in DEFAULTS})
    print(f"validation accuracy {record['validation_accuracy']:.3f} after {record['settings']['steps']} steps "
          f"({record['train_seconds']:.0f} s); saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
