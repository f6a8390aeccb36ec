#!/usr/bin/env python
"""Ablate system C's learned stages: train each objective variant, evaluate its validation-selected stages.

Each variant is one ``train_llava_pruner.py`` run (same base, task, steps and seed; ``--set`` overrides of the
config) into ``--output-dir/<variant>``; its ``pruning_final.pt`` (the stages of the periodic validation with the
best accuracy) is then evaluated by ``eval_llava_pruning.py --methods learned`` on freshly generated test questions
at every budget. ``untrained`` is the same architecture with freshly initialised heads (no training). The table
(accuracy with its binomial standard error, per budget) is printed and written to ``--output-dir/ablation.json``;
variants evaluated earlier on the same task, seed and number of questions stay in it.

    python scripts/ablate_llava_pruner.py --task clutter --max-steps 200
    python scripts/ablate_llava_pruner.py --variants full_gan,feature_match --max-steps 400
    python scripts/ablate_llava_pruner.py --evaluate-only      # the trained variants again (e.g. after an eval change)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cli import REPO_ROOT, ArgumentParser, UserError, check_output_dir, run_cli, write_json

VARIANTS: dict[str, list[str]] = {
    "untrained": [],
    "task_only": ["adv_loss_weight=0"],
    "adversarial_only": ["task_loss_weight=0"],
    "full_gan": [],
    "feature_match": ["feature_match_weight=25"],
    "question_aware": ["merger_type=question_aware", "feature_match_weight=25"],
    "distill": ["attention_distill_weight=10"],
    "distill_question_aware": ["merger_type=question_aware", "attention_distill_weight=10"],
    "task_only_lr1e-3": ["adv_loss_weight=0", "lr_merger=1e-3", "lr_pruners=1e-3"],
    "full_gan_lr1e-3": ["lr_merger=1e-3", "lr_pruners=1e-3"],
    "distill_lr1e-3": ["attention_distill_weight=10", "lr_merger=1e-3", "lr_pruners=1e-3"],
}
"""Variant -> config overrides (``--set``) of its training run. ``full_gan`` is the configured objective
(``configs/vision_token_pruning.yaml``); ``feature_match`` adds paired feature matching at the task loss's weight;
``question_aware`` also conditions the merger on the question; ``distill`` adds attention distillation (each stage's
scores learn the unpruned answer's attention over the vision tokens), ``distill_question_aware`` with the
question-aware merger; ``*_lr1e-3`` the same objectives at 50 times the published learning rate of the merger and
the pruner heads (2e-5, set for heads on a 7B model; these heads are trained from scratch in 200 steps)."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="clutter", choices=("shapes", "clutter"))
    p.add_argument("--model-path", default=None, help="base LLaVA directory (default: the task's tiny base)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=200, help="training steps per variant (default: %(default)s)")
    p.add_argument("--budgets", default=None, help="evaluated budgets (default: the task's, as eval_llava_pruning)")
    p.add_argument("--num-questions", type=int, default=400, help="test questions (default: %(default)s)")
    p.add_argument("--eval-size", type=int, default=100, help="validation questions per periodic eval")
    p.add_argument("--seed", type=int, default=0, help="test questions' seed (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "llava_ablation")
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-evaluate the stages each variant already has in --output-dir (no training)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"--variants: unknown {unknown or args.variants!r}; allowed: {', '.join(VARIANTS)}")
    for flag in ("max_steps", "num_questions", "eval_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_output_dir(args.output_dir, "--output-dir")
    args.variants = variants
    return args


def run(script: str, *argv: str) -> None:
    """``python scripts/<script>.py *argv``; its one-line error becomes ours."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / f"{script}.py"), *argv], cwd=REPO_ROOT,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"{script}.py failed ({done.returncode}): {last}")


def main(argv=None) -> int:
    args = parse_args(argv)
    common = ["--task", args.task] + (["--model-path", args.model_path] if args.model_path else [])
    table, selection = {}, {}
    for variant in args.variants:
        out = args.output_dir / variant
        evaluate = ["eval_llava_pruning", *common, "--seed", str(args.seed), "--num-questions", str(args.num_questions),
                    "--output", str(out / "eval.json"), "--stats-json", str(out / "stats.json")]
        if args.budgets:
            evaluate += ["--budgets", args.budgets]
        if variant == "untrained":  # built from the config file as it is (no --set)
            run(*evaluate, "--methods", "untrained")
        else:
            sets = [x for s in VARIANTS[variant] + args.set for x in ("--set", s)]
            if args.evaluate_only:
                if not (out / "pruning_final.pt").is_file():
                    raise UserError(f"--evaluate-only: no trained stages at {out / 'pruning_final.pt'}; train the "
                                    f"variant first (drop --evaluate-only)")
            else:
                print(f"[{variant}] training ({' '.join(VARIANTS[variant] + args.set) or 'the configured objective'})")
                run("train_llava_pruner", *common, "--max-steps", str(args.max_steps), "--eval-size",
                    str(args.eval_size), "--output-dir", str(out), "--overwrite", *sets)
            run(*evaluate, "--methods", "learned", "--checkpoint", str(out / "pruning_final.pt"))
        table[variant] = json.loads((out / "stats.json").read_text())["methods"]
        print(f"[{variant}] " + ", ".join(f"{name} {m['accuracy']:.3f}+-{m['accuracy_se']:.3f}"
                                          for name, m in table[variant].items()))
    path = args.output_dir / "ablation.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    same_setup = all(previous.get(k) == v for k, v in (("task", args.task), ("seed", args.seed),
                                                        ("num_questions", args.num_questions)))
    if previous and same_setup:  # other variants evaluated earlier on the same questions stay in the table
        table = {**{k: v for k, v in previous.get("variants", {}).items() if k not in table}, **table}
    for variant in table:  # which periodic validation chose each variant's stages (its training log says)
        log_path = args.output_dir / variant / "train_log.json"
        if variant != "untrained" and log_path.is_file():
            log = json.loads(log_path.read_text())
            evals = [e for e in log["evals"] if "val_accuracy" in e]
            best = max(evals, key=lambda e: (e["val_accuracy"], e["step"]))
            selection[variant] = {"selected_step": best["step"], "validation_accuracy": best["val_accuracy"],
                                  "steps_trained": log["step"]}
    write_json(path, {"task": args.task, "max_steps": args.max_steps, "seed": args.seed,
                      "num_questions": args.num_questions, "variants": table, "selection": selection})
    print(f"wrote {args.output_dir / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
