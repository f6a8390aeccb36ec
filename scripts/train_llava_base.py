#!/usr/bin/env python
"""Train the embedded tiny LLaVA-1.5 on the generated shapes VQA task (the base that system C prunes).

All weights (CLIP tower, projector, Llama LLM) are trained from the embedded model's seeded
initialisation with next-token cross-entropy on the one-word answer (+ EOS), AdamW, linear
warm-up then cosine decay, on a deterministic stream of training samples
(``data/vqa_shapes.py``). A from-scratch VLM first learns the answer priors and ignores the
image for thousands of steps; to get past that within minutes, an auxiliary dense loss
(``--aux-weight``) trains linear probes on the projector outputs to predict, for every image
token, the colour, the shape and the (colour, shape) pair covering its patch
(``vqa_shapes.patch_labels``). The probe is
discarded: the saved model is a plain ``LlavaForConditionalGeneration``. The embedded model's
seeded init draws every weight with std 0.02; its text embeddings would then stay ~50x smaller
than the projected image features, the question words' identity drowns in the image tokens'
attention output after the first layer, and the model answers without reading the question.
Training therefore starts from text embeddings rescaled to ``--embed-std`` (0.5), and from
LLM q/k projections rescaled to ``--qk-std`` (0.1), so attention can turn content-based before
the near-uniform attention over 64 look-alike image tokens sets in (gradient clipping at 5). Each training
image comes with ``--turns`` (4) questions in one LLaVA-1.5 multi-turn conversation
(``USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...``, every answer supervised):
the image is encoded once for four answers, and different questions about the same image
force the model to read the question rather than answer from its type alone. Held-out
evaluation is single-turn (exactly turn 1's format). The result is written with ``save_pretrained`` (model and
processor), so it loads with ``from_pretrained`` like any LLaVA directory, plus
``vqa_base_metrics.json``: held-out exact-match accuracy per question type next to its chance
levels (1 / number of answers, and the best constant guess).

The cluttered-scene base (``--task clutter``, ``data/vqa_clutter.py``; 224 px, 256 vision tokens) is trained in two
phases, as LLaVA-1.5's tower comes pretrained and stays frozen: ``--tower-steps`` steps train the CLIP tower alone,
with linear heads on its feature layer that must read every patch's object colour, shape, size and centre and the
patch's row and column; then ``--steps`` steps train projector and LLM on the conversations with the tower frozen
(``--freeze-tower``), with the dense probes on the projector outputs, the row/column probes (``--position-weight``,
``--sincos-positions``) and the readout probes at each answer position (``--readout-weight``). Without
``--output-dir`` it (re)trains the shipped base ``models/trained/llava_clutter`` as it was made (``make
train-llava-base``): phase 1 with ``CLUTTER_DEFAULTS``, then phase 2 (``CLUTTER_FINETUNE``: 1500 more steps in which
the two objects of a position or relation question are each read by their own head), then phase 3
(``CLUTTER_POSITION``: 800 more steps, two in five questions about position, with readout probes for the relation
word's axis and direction and for the answer); ``--force`` over the shipped one, ``--resume`` continues the
checkpoints in ``runs/llava_clutter_base/``.

Default (shapes): trains once into the embedded-model cache (``.cache/tiny_models/llava-vqa-v1``) and
reuses it afterwards; ``--output-dir`` trains into another directory, ``--force`` retrains.
Reproducible from ``--seed`` on one machine (CPU kernels may round differently elsewhere).

    python scripts/train_llava_base.py                 # cached default (1200 steps; ~11 min single-threaded
                                                       # on a busy 2-core VM, less on an idle one)
    python scripts/train_llava_base.py --steps 200 --output-dir /tmp/base
    python scripts/train_llava_base.py --task clutter --force   # the shipped clutter base (~50 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli import ArgumentParser, UserError, atomic_path, check_model_path, check_output_dir, set_torch_threads, run_cli
from models.tiny.llava_vqa import (
    BASE_VERSION,
    CLUTTER_BASE_DIR,
    CLUTTER_DEFAULTS,
    CLUTTER_SCHEDULE,
    DEFAULTS,
    TASKS,
    METRICS_FILE,
    default_base_path,
    format_metrics,
    train_base,
    trained_base_dir,
)

MINIMUMS = {"steps": 1, "batch_size": 1, "eval_size": 1, "turns": 1, "warmup": 0, "weight_decay": 0.0,
            "aux_weight": 0.0, "embed_std": 0.0, "qk_std": 0.0, "clip": 0.0, "seed": 0, "position_weight": 0.0,
            "sincos_positions": 0.0, "readout_weight": 0.0, "tower_steps": 0, "freeze_tower": 0, "attention_weight": 0.0,
            "value_weight": 0.0, "evidence_heads": 1, "readout_comparisons": 0}
"""Smallest allowed value of each training setting (``lr`` must be > 0, ``text_loss`` 0 or 1; ``readout_layer`` an
index into the LLM's hidden states, checked against the model)."""


def validate(args) -> None:
    """Every setting and path, before any model is loaded or anything is written."""
    for key, low in MINIMUMS.items():
        value = getattr(args, key)
        if not value >= low:  # also catches nan
            raise UserError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.text_loss not in (0, 1) or args.freeze_tower not in (0, 1):
        raise UserError(f"--text-loss and --freeze-tower must be 0 or 1, got {args.text_loss} and {args.freeze_tower}")
    if args.readout_comparisons not in (0, 1):
        raise UserError(f"--readout-comparisons must be 0 or 1, got {args.readout_comparisons}")
    if args.evidence_heads not in (1, 2):
        raise UserError(f"--evidence-heads must be 1 or 2, got {args.evidence_heads}")
    if not args.tower_lr > 0:
        raise UserError(f"--tower-lr must be > 0, got {args.tower_lr}")
    if args.tower_steps > 0 and args.task != "clutter":
        raise UserError("--tower-steps pretrains the tower on per-patch targets of the clutter task: pass --task clutter")
    if args.eval_every < 0 or args.val_size < 1:
        raise UserError(f"--eval-every must be >= 0 and --val-size >= 1, got {args.eval_every} and {args.val_size}")
    if args.resume and args.eval_every == 0:
        raise UserError("--resume continues a checkpoint, which only --eval-every N > 0 writes: pass --eval-every")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_model_path(args.model_path)
    check_output_dir(args.output_dir, "--output-dir")
    if args.model_path is not None and args.aux_weight > 0:  # the dense probe needs a square patch grid
        from transformers import AutoConfig

        from cli import load_or_explain

        config = load_or_explain("the LLaVA config", args.model_path, lambda: AutoConfig.from_pretrained(args.model_path))
        tokens = getattr(config, "image_seq_length", None)
        if tokens is not None and round(tokens ** 0.5) ** 2 != tokens:
            raise UserError(f"--aux-weight needs a square patch grid, {args.model_path} has {tokens} image tokens: "
                            "pass --aux-weight 0")


def train_shipped_clutter_base(args, settings: dict) -> int:
    """``--task clutter`` without ``--output-dir``: (re)train the shipped base ``models/trained/llava_clutter`` as it was
    made, in three phases: ``CLUTTER_DEFAULTS`` from the embedded 224 px tiny LLaVA into
    ``runs/llava_clutter_base/phase1``, ``CLUTTER_FINETUNE`` from that into ``runs/llava_clutter_base/phase2`` (each
    reused when complete), then ``CLUTTER_POSITION`` from that into the shipped directory (checkpoints and JSON logs
    ``phase1.json`` ... ``phase3.json`` in ``runs/llava_clutter_base/``). The shipped one is replaced only with
    ``--force``, and only once the new one is saved."""
    from cli import REPO_ROOT
    from models.tiny.llava_vqa import CLUTTER_FINETUNE, CLUTTER_POSITION

    if settings != CLUTTER_DEFAULTS or args.model_path is not None:
        raise UserError("the shipped clutter base has fixed settings: pass --output-dir to train with others")
    if (CLUTTER_BASE_DIR / "config.json").is_file() and not args.force and not args.resume:
        raise UserError(f"the clutter base is already shipped in {CLUTTER_BASE_DIR}: pass --force to retrain over it, "
                        "or --output-dir for another copy")
    set_torch_threads(args.threads)
    from models.tiny.llava import tiny_clutter_llava_dir

    if args.checkpoint is not None:
        raise UserError("--checkpoint: the shipped base's checkpoints are runs/llava_clutter_base/phase<1-3>.pt "
                        "(pass --output-dir to train elsewhere)")
    work = REPO_ROOT / "runs" / "llava_clutter_base"
    work.mkdir(parents=True, exist_ok=True)
    schedule = dict(task="clutter", eval_every=args.eval_every, val_size=args.val_size, resume=args.resume)
    phase1 = work / "phase1"
    if not (phase1 / METRICS_FILE).is_file():
        train_base(tiny_clutter_llava_dir(), phase1, checkpoint=work / "phase1.pt", **schedule, **CLUTTER_DEFAULTS)
    readme = CLUTTER_BASE_DIR / "README.md"
    how_it_was_made = readme.read_text() if readme.is_file() else None
    phase2 = work / "phase2"
    if not (phase2 / METRICS_FILE).is_file():
        train_base(phase1, phase2, checkpoint=work / "phase2.pt", **schedule, **CLUTTER_FINETUNE)
    train_base(phase2, CLUTTER_BASE_DIR, checkpoint=work / "phase3.pt", **schedule, **CLUTTER_POSITION)
    if how_it_was_made is not None:  # the saved directory is new: keep its README (update its numbers by hand)
        readme.write_text(how_it_was_made)
    print(f"saved to {CLUTTER_BASE_DIR} (the JSON logs of the three phases: {work}/phase<1-3>.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None,
                        help="LLaVA directory to start from (default: the embedded tiny LLaVA-1.5)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where to save (default: the embedded-model cache, llava-vqa-v{BASE_VERSION})")
    parser.add_argument("--force", action="store_true",
                        help="retrain even if the output already exists (replaced only once the new model is saved)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's, as for the recorded numbers in docs/BENCHMARKS.md)")
    parser.add_argument("--task", default="shapes", choices=sorted(TASKS),
                        help="shapes: the plain 112 px task (data/vqa_shapes.py); clutter: the cluttered 224 px scenes "
                             "(data/vqa_clutter.py), from the 224 px tiny LLaVA")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validate (val split) and checkpoint every N steps; the JSON log beside the checkpoint "
                             f"(default: 0, none; clutter: {CLUTTER_SCHEDULE['eval_every']})")
    parser.add_argument("--val-size", type=int, default=None,
                        help=f"validation questions per evaluation (default: 200; clutter: {CLUTTER_SCHEDULE['val_size']})")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint file (default: <output-dir>.checkpoint.pt beside --output-dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --checkpoint")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"(default: {value}; clutter: {CLUTTER_DEFAULTS[key]})")
    args = parser.parse_args(argv)
    task_defaults = CLUTTER_DEFAULTS if args.task == "clutter" else DEFAULTS
    schedule = CLUTTER_SCHEDULE if args.task == "clutter" else {"eval_every": 0, "val_size": 200}
    for key, value in {**task_defaults, **schedule}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    validate(args)
    settings = {k: getattr(args, k) for k in DEFAULTS}
    if args.output_dir is None and args.task == "clutter":
        return train_shipped_clutter_base(args, settings)
    custom = (args.model_path is not None or settings != DEFAULTS or args.task != "shapes" or args.eval_every > 0
              or args.resume)
    if args.output_dir is None and custom:
        raise UserError("non-default settings, --eval-every and --resume need --output-dir "
                        "(the cache holds only the default base)")
    if args.output_dir is not None and args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.force:
        raise UserError(f"--output-dir {str(args.output_dir)!r} is not empty; pass --force to overwrite")
    set_torch_threads(args.threads)
    from models.tiny.llava import tiny_llava_dir

    if args.output_dir is None:
        if args.force:  # retrain the cached default; the old one stays until the new one is complete
            from models.tiny import COMPLETE_MARKER

            with atomic_path(default_base_path()) as tmp:
                train_base(tiny_llava_dir(), tmp, **DEFAULTS)
                (tmp / COMPLETE_MARKER).write_text("ok\n")
        directory = trained_base_dir()
        metrics_path = directory / METRICS_FILE
        if metrics_path.exists():
            print(f"base model: {directory}")
            print(format_metrics(json.loads(metrics_path.read_text())))
        return 0
    if args.model_path is not None:
        model_path = args.model_path
    elif args.task == "clutter":
        from models.tiny.llava import tiny_clutter_llava_dir

        model_path = tiny_clutter_llava_dir()
    else:
        model_path = tiny_llava_dir()
    checkpoint = args.checkpoint or args.output_dir.parent / f"{args.output_dir.name}.checkpoint.pt"
    train_base(model_path, args.output_dir, task=args.task, eval_every=args.eval_every, val_size=args.val_size,
               checkpoint=checkpoint if args.eval_every > 0 else None, resume=args.resume, **settings)
    print(f"saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
