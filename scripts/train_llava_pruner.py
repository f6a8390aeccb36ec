#!/usr/bin/env python
"""Train system C's learned stages (token merger + pruner heads) adversarially on a frozen LLaVA-1.5.

The base model is frozen. Each step, on a batch of the training split of ``--task`` (the shapes-VQA task, or the
cluttered scenes of ``data/vqa_clutter.py`` on the shipped base ``models/trained/llava_clutter``):

1. *real*: the unpruned model (pruning disabled: the upstream path) -> final hidden states;
2. *fake*: the pruned model in "mask" mode (merger + pruner heads, Gumbel-top-k with the
   straight-through estimator, temperature annealed 1.0 -> 0.1 by ``temperature_at``) ->
   logits and final hidden states;
3. discriminator step: ``BCE(D(real), 1) + BCE(D(fake.detach()), 0)`` on the hidden states of
   the rows that predict the answer (``answer_position_mask``);
4. generator step (merger + pruners): ``adv * BCE(D(fake), 1) + task * CE(answer) +
   merge_sparsity * H(assignment)`` (+ the optional budget term), weights and learning rates
   from the config (``configs/vision_token_pruning.yaml``).

Runs under Hugging Face Accelerate (``Accelerator``, ``accelerator.prepare``,
``accelerator.backward``): ``python scripts/train_llava_pruner.py`` on one CPU, or
``accelerate launch --num_processes 4 scripts/train_llava_pruner.py`` for data parallel on GPUs,
unchanged. Writes to ``--output-dir``: ``train_log.json`` (losses every ``log_every`` steps,
periodic accuracy of the pruned model on the *validation* split), ``checkpoint-<step>/state.pt``
every ``save_every`` steps (resume with ``--resume``), ``pruning_last.pt`` (the stages after the
last step) and ``pruning_final.pt`` (what ``eval_llava_pruning.py`` loads): the stages of the
periodic evaluation with the best validation accuracy, the untrained initialisation (step 0)
included, ties to the later step. Adversarial training is not monotone (on the tiny task the
accuracy of the pruned model can fall in the low-temperature phase), so the selection is made on
a split that the evaluation never reports (``val``; the evaluation uses ``heldout``).

Every file is written to a temporary name and renamed into place (a killed run never leaves a half
file). Each checkpoint and stage file holds the run id (``run_id``, one per fresh run), the base
model it was trained on (``base_model``, ``base_fingerprint``), the config and the fingerprint of
the settings that decide the trajectory (``config_fingerprint``: every config key except
``output_dir``, ``save_every`` and ``log_every``, plus ``--eval-size``, the weight dtype and the
number of processes). ``--resume`` scans ``checkpoint-<step>`` newest first, skips (one line each)
unreadable ones and those of another run, config or base, and continues from the newest good one;
a fresh run into a directory that holds a run refuses unless ``--overwrite`` (which removes that
run's checkpoints, stage files and log).

    python scripts/train_llava_pruner.py                         # the shipped cluttered-scene base
    python scripts/train_llava_pruner.py --task shapes           # the tiny shapes-VQA base (trained if missing)
    python scripts/train_llava_pruner.py --model-path /path/llava-1.5-7b-hf --max-steps 2000
    python scripts/train_llava_pruner.py --resume                # continue from the newest good checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from cli import (
    REPO_ROOT,
    ArgumentParser,
    UserError,
    atomic_path,
    check_model_path,
    check_output_dir,
    set_torch_threads,
    run_cli,
    save_torch,
    write_json,
)

import torch

DEFAULT_CONFIG = REPO_ROOT / "configs" / "vision_token_pruning.yaml"
FINAL_NAME = "pruning_final.pt"
LAST_NAME = "pruning_last.pt"
BEST_NAME = "pruning_best.pt"  # written whenever the validation accuracy improves; renamed to FINAL_NAME
LOG_NAME = "train_log.json"
STATE_NAME = "state.pt"
RUN_FILES = (FINAL_NAME, LAST_NAME, BEST_NAME, LOG_NAME)
CHECKPOINT_FORMAT = "llava-pruner-checkpoint/2"
CHECKPOINT_KEYS = ("run_id", "config_fingerprint", "settings", "config", "base_model", "pruning", "discriminator",
                   "gen_opt", "disc_opt", "generator", "torch_rng", "step", "history", "evals")
BOOKKEEPING_KEYS = ("output_dir", "save_every", "log_every")
"""Config keys that do not change the trajectory: a resumed run may change them."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_overrides(items: list[str]) -> dict:
    """``["lr_merger=1e-3", "keep_ratios=[0.5,0.5,0.5]"]`` -> flat config keys (YAML values)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(error).split())[:120]})") from None
    return out


def load_training_config(path: Path, overrides: dict, max_steps: int | None, output_dir: Path | None):
    """The YAML config with ``--set`` overrides and the CLI's train settings applied (validated)."""
    import yaml

    from pruning.llava.config import ConfigError, config_from_dict, load_config

    if path.is_dir():
        raise UserError(f"--config {str(path)!r} is a directory: pass a YAML file")
    try:
        cfg = load_config(path)
        data = cfg.to_dict()
        flat = {k: v for section in data.values() for k, v in section.items()}
        flat.update(overrides)
        if max_steps is not None:
            flat["max_steps"] = max_steps
        if output_dir is not None:
            flat["output_dir"] = str(output_dir)
        return config_from_dict(flat, source=f"{path} + command line")
    except FileNotFoundError as error:
        raise UserError(f"--config: {error}") from None
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(" ".join(str(error).split())) from None


# ----------------------------------------------------------------------------- run identity and checkpoints


def resume_settings(cfg, *, eval_size: int, dtype: str, world_size: int, task: str = "shapes") -> dict:
    """The settings a resumed run must share with the checkpoint (all that shapes the trajectory; the task only when
    it is not the shapes task, so runs from before ``--task`` keep their fingerprint)."""
    flat = {k: v for section in cfg.to_dict().values() for k, v in section.items() if k not in BOOKKEEPING_KEYS}
    return {**flat, "eval_size": eval_size, "dtype": dtype, "world_size": world_size,
            **({"task": task} if task != "shapes" else {})}


def settings_fingerprint(settings: dict) -> str:
    """sha256 of the canonical JSON of ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def settings_diff(old: dict, new: dict, limit: int = 3) -> str:
    """``"max_steps 4 -> 6, lr_pruners 2e-05 -> 0.001"``: what changed from the checkpoint's settings."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "fingerprint only"


class CheckpointProblem(Exception):
    """Why a checkpoint cannot be resumed from (one line)."""


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` (``checkpoint-<step>/state.pt``), structurally checked; else CheckpointProblem."""
    if not path.is_file():
        raise CheckpointProblem("no state.pt in it" if path.parent.is_dir() else "missing")
    from models.tiny.llava_vqa import load_torch_file

    try:
        state = load_torch_file(path)
    except ValueError as error:
        raise CheckpointProblem(str(error)) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointProblem("not a train_llava_pruner.py checkpoint")
    if "run_id" not in state:
        raise CheckpointProblem("written by an older version without a run id and config: cannot be checked")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointProblem(f"incomplete: no {', '.join(missing)}")
    if any(e.get("val_accuracy") is not None for e in state["evals"]):
        best = path.parent / BEST_NAME  # the best-so-far stages travel with the checkpoint
        if not best.is_file() or best.stat().st_size == 0:
            raise CheckpointProblem(f"its best-so-far stages ({BEST_NAME}) are missing")
    return state


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` directories, newest (highest step) first; temporary ``.checkpoint-*`` ignored."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()] if output_dir.is_dir() else []
    return sorted(found, key=lambda p: (int(p.name.split("-", 1)[1]), p.stat().st_mtime), reverse=True)


def logged_run_id(output_dir: Path) -> str | None:
    """The run id in ``train_log.json`` (the run that wrote the directory last), if readable."""
    try:
        return json.loads((output_dir / LOG_NAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _short(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def incompatibility(state: dict, fingerprint: str, settings: dict, base: dict) -> str | None:
    """Why a readable checkpoint cannot continue this run (None: it can)."""
    from models.tiny.llava_vqa import base_mismatch

    if state["config_fingerprint"] != fingerprint:
        return f"another config ({settings_diff(state['settings'], settings)})"
    problem = base_mismatch(state, base)
    if problem:
        return problem
    return None


def find_resume_checkpoint(output_dir: Path, fingerprint: str, settings: dict, base: dict, log=print,
                           exclude: Path | None = None) -> tuple[tuple[Path, dict] | None, list[str]]:
    """``((state.pt path, state) or None, skipped)``: the newest good checkpoint of this run, config and base.

    Scans ``checkpoint-<step>`` newest first; each one skipped (unreadable, another run, config or base)
    is logged in one line (``log=None``: silent) and listed in ``skipped`` as ``"<name>: <why>"``.
    """
    run_id = logged_run_id(output_dir)
    skipped = []
    for folder in checkpoint_dirs(output_dir):
        path = folder / STATE_NAME
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            state = read_checkpoint(path)
            reason = incompatibility(state, fingerprint, settings, base)
            if reason is None and run_id and state["run_id"] != run_id:
                reason = f"from another run ({state['run_id'][:8]}; {LOG_NAME} is run {run_id[:8]}'s)"
        except CheckpointProblem as problem:
            reason = str(problem)
        if reason is None:
            if skipped and log:
                log(f"resuming from the last good checkpoint, {_short(path, output_dir)} (step {state['step']})")
            return (path, state), skipped
        skipped.append(f"{folder.name}: {reason}")
        if log:
            log(f"skipping {_short(path, output_dir)}: {reason}")
    return None, skipped


def run_summary(output_dir: Path) -> str | None:
    """What run files ``output_dir`` holds (None: none), e.g. ``run 1a2b3c4d: checkpoint-2, pruning_final.pt``."""
    if not output_dir.is_dir():
        return None
    names = [p.name for p in reversed(checkpoint_dirs(output_dir))] + [n for n in RUN_FILES if (output_dir / n).exists()]
    if not names:
        return None
    run_id = logged_run_id(output_dir)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"run {run_id[:8]}: " if run_id else "") + shown


def remove_run_files(output_dir: Path, log=print) -> None:
    """``--overwrite``: the previous run's checkpoints, stage files, log and interrupted temporary files."""
    removed = 0
    for folder in checkpoint_dirs(output_dir):
        shutil.rmtree(folder)
        removed += 1
    for name in RUN_FILES:
        if (output_dir / name).exists():
            (output_dir / name).unlink()
            removed += 1
    removed += remove_leftovers(output_dir, log=None)
    if removed:
        log(f"--overwrite: removed the previous run's {removed} file(s) from {output_dir}")


def remove_leftovers(output_dir: Path, log=print) -> int:
    """Temporary files and folders of saves that a kill interrupted (``.checkpoint-4.tmp-<pid>`` ...)."""
    names = ["checkpoint-*", *RUN_FILES]
    leftovers = [p for pattern in names for p in output_dir.glob(f".{pattern}.tmp-*")] if output_dir.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if log:
            log(f"removed {p.name}: a save that was interrupted")
    return len(leftovers)


def write_checkpoint(folder: Path, state: dict, best: Path | None = None) -> None:
    """``folder/state.pt`` (+ a copy of the best-so-far stages), built under a temporary name and renamed."""
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / STATE_NAME)
        if best is not None and best.is_file():
            shutil.copyfile(best, tmp / BEST_NAME)


def copy_atomic(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def eager_attention(model, active: bool = True):
    """Run the language model with eager attention inside the block (SDPA returns no attention weights), then
    restore the implementation it had."""
    text_config = model.config.text_config
    saved = text_config._attn_implementation
    if active:
        text_config._attn_implementation = "eager"
    try:
        yield
    finally:
        text_config._attn_implementation = saved


@torch.no_grad()
def split_accuracy(model, processor, samples) -> float:
    from data.vqa_shapes import accuracy_by_type, generate_answers

    return accuracy_by_type(samples, generate_answers(model, processor, samples))["all"]


# ----------------------------------------------------------------------------- command line


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--model-path", default=None,
                        help="frozen LLaVA-1.5 directory (default: the tiny base of --task: shapes trained into the "
                             "cache if missing, clutter shipped in models/trained/llava_clutter)")
    parser.add_argument("--task", default="clutter", choices=("shapes", "clutter"),
                        help="training and validation questions: the cluttered scenes (on the shipped base) or the "
                             "plain shapes task (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--output-dir", type=Path, default=None, help="override train.output_dir")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from a checkpoint (a checkpoint-<step> dir or its state.pt; no value: the newest "
                             "good one of this config in the output directory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output directory that holds another run (its files are removed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set lr_pruners=1e-3 (repeatable)")
    parser.add_argument("--eval-size", type=int, default=200, help="validation questions per periodic eval")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="base model weights (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's, as for the recorded numbers in docs/BENCHMARKS.md)")
    args = parser.parse_args()
    for flag, value in (("--max-steps", args.max_steps), ("--eval-size", args.eval_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.resume is not None and args.overwrite:
        raise UserError("--resume continues the run in the output directory, --overwrite replaces it: pass one")
    check_model_path(args.model_path)
    if args.model_path is None and args.task == "clutter":
        from models.tiny.llava_vqa import shipped_clutter_base

        args.model_path = shipped_clutter_base()
    cfg = load_training_config(args.config, parse_overrides(args.set), args.max_steps, args.output_dir)
    output_dir = Path(cfg.train.output_dir)
    if not output_dir.is_absolute():
        output_dir = REPO_ROOT / output_dir
    check_output_dir(output_dir, "--output-dir" if args.output_dir is not None else "output_dir (config)")
    resume_path = None
    if args.resume is not None and args.resume != "latest":
        resume_path = Path(args.resume)
        if resume_path.is_dir():
            resume_path = resume_path / STATE_NAME
        if not resume_path.is_file():
            raise UserError(f"--resume {args.resume!r}: no checkpoint there (expected a checkpoint-<step> directory "
                            f"or its {STATE_NAME})")
    elif args.resume is None and not args.overwrite:
        held = run_summary(output_dir)
        if held:
            raise UserError(f"--output-dir {str(output_dir)!r} already holds a training run ({held}): pass --resume to "
                            "continue it, --overwrite to replace it, or another --output-dir")
    return train(args, cfg, output_dir, resume_path)


def choose_checkpoint(output_dir: Path, resume_path: Path | None, fingerprint: str, settings: dict, base: dict,
                      max_steps: int, log=print) -> tuple[Path, dict]:
    """The checkpoint to resume from (checked before any model is loaded); bad ones are one-line errors."""
    if resume_path is None:  # --resume: the newest good checkpoint in the output directory
        found, skipped = find_resume_checkpoint(output_dir, fingerprint, settings, base, log=log)
        if found is None:
            why = "; ".join(skipped) if skipped else "none saved"
            raise UserError(f"--resume: no checkpoint of this run's config and base in {str(output_dir)!r} ({why}); "
                            "pass --overwrite to start afresh there, or another --output-dir")
        path, state = found
    else:
        path = resume_path
        try:
            state = read_checkpoint(path)
            reason = incompatibility(state, fingerprint, settings, base)
        except CheckpointProblem as problem:
            reason = str(problem)
        if reason is not None:
            in_run = path.parent.name.startswith("checkpoint-") and path.parent.name.split("-", 1)[1].isdigit()
            searched = path.parent.parent if in_run else output_dir
            good, _ = find_resume_checkpoint(searched, fingerprint, settings, base, log=None, exclude=path)
            hint = (f"the last good checkpoint is {good[0].parent} (step {good[1]['step']}): --resume {good[0].parent}"
                    if good else f"no good checkpoint of this config in {str(searched)!r} either")
            raise UserError(f"--resume {str(path)!r}: {reason}; {hint}")
    if state["step"] >= max_steps:
        raise UserError(f"--resume: run {state['run_id'][:8]} already finished all {max_steps} steps ({path}); "
                        "nothing to resume: pass --overwrite to train afresh (a longer run anneals differently)")
    return path, state


def train(args, cfg, output_dir: Path, resume_path: Path | None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from models.tiny.llava_vqa import base_identity, default_base_path

    t_cfg, o_cfg = cfg.train, cfg.optim
    accelerator = Accelerator(
        mixed_precision=t_cfg.mixed_precision,
        gradient_accumulation_steps=t_cfg.grad_accum_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_torch_threads(args.threads)
    set_seed(t_cfg.seed)
    main_process = accelerator.is_main_process
    log = accelerator.print
    world = accelerator.num_processes
    dtype = DTYPES.get(args.dtype) if args.dtype != "auto" else (
        torch.float32 if accelerator.device.type == "cpu" else torch.bfloat16)
    settings = resume_settings(cfg, eval_size=args.eval_size, dtype=str(dtype).removeprefix("torch."), world_size=world,
                               task=args.task)
    fingerprint = settings_fingerprint(settings)
    base = base_identity(args.model_path if args.model_path is not None else default_base_path())

    state = None
    if args.resume is not None:  # checked before any model is loaded (or the default base trained)
        resume_path, state = choose_checkpoint(output_dir, resume_path, fingerprint, settings, base, t_cfg.max_steps, log)
    run_id = state["run_id"] if state is not None else uuid.uuid4().hex

    from tqdm.auto import tqdm

    from data.vqa_shapes import VQACollator, VQADataset
    from models.tiny.llava_vqa import load_pruning_base, task_module
    from pruning.llava.config import temperature_at
    from pruning.llava.modules import (
        Discriminator,
        adversarial_losses,
        answer_attention_teacher,
        answer_position_mask,
        merge_sparsity_loss,
        paired_feature_matching,
        task_loss,
        token_budget_loss,
        total_generator_loss,
    )
    from pruning.llava.runtime import attach_pruning, pruning_checkpoint, stage_distillation

    model_path = args.model_path
    if model_path is None:
        from models.tiny.llava_vqa import trained_base_dir

        with accelerator.main_process_first():
            model_path = str(trained_base_dir(log=log))
        base = base_identity(model_path)
    processor, model = load_pruning_base(model_path, dtype=dtype)
    model.requires_grad_(False)
    model.to(accelerator.device)
    try:
        pruning = attach_pruning(model, cfg, dtype=torch.float32)
    except ValueError as error:
        raise UserError(f"config does not fit the model: {error}") from None
    model.eval()
    pruning.train()
    pruning.generator = torch.Generator(device=accelerator.device).manual_seed(t_cfg.seed + accelerator.process_index)
    text_dim = model.config.text_config.hidden_size
    discriminator = Discriminator.from_config(text_dim, cfg.discriminator).to(accelerator.device)
    groups = pruning.trainable_parameter_groups()
    gen_params = [{"params": groups["merger"], "lr": o_cfg.lr_merger},
                  {"params": groups["pruners"], "lr": o_cfg.lr_pruners}]
    gen_params = [g for g in gen_params if g["params"]]
    gen_opt = torch.optim.AdamW(gen_params, weight_decay=o_cfg.weight_decay)
    disc_opt = torch.optim.AdamW(discriminator.parameters(), lr=o_cfg.lr_discriminator, weight_decay=o_cfg.weight_decay)

    per_step = t_cfg.batch_size * t_cfg.grad_accum_steps * world
    task = task_module(args.task)
    dataset = VQADataset("train", t_cfg.max_steps * per_step, seed=t_cfg.seed, sample_fn=task.make_sample)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t_cfg.batch_size, shuffle=False,
                                         collate_fn=VQACollator(processor, with_answers=True))
    model, gen_opt, discriminator, disc_opt, loader = accelerator.prepare(model, gen_opt, discriminator, disc_opt, loader)
    layer = cfg.discriminator.discriminator_hidden_layer
    distill = cfg.loss.attention_distill_weight > 0
    image_id = accelerator.unwrap_model(model).config.image_token_id

    provenance = {"run_id": run_id, "config_fingerprint": fingerprint, **base}

    start_step, history, evals = 0, [], []
    if state is not None:
        try:
            pruning.load_state_dict(state["pruning"]["state_dict"])
            accelerator.unwrap_model(discriminator).load_state_dict(state["discriminator"])
            gen_opt.load_state_dict(state["gen_opt"])
            disc_opt.load_state_dict(state["disc_opt"])
            pruning.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise UserError(f"--resume {str(resume_path)!r} does not fit this model ({first}); pass --overwrite to "
                            "start afresh") from None
        start_step, history, evals = state["step"], state["history"], state["evals"]
        log(f"resumed from {resume_path} at step {start_step} (run {run_id[:8]})")
    eval_samples = task.make_split("val", args.eval_size, seed=t_cfg.seed)

    def save(step: int, final: bool = False) -> None:
        accelerator.wait_for_everyone()
        if not main_process:
            return
        if final:
            save_torch(pruning_checkpoint(pruning, **provenance, steps=step), output_dir / LAST_NAME)
            best = max((e for e in evals if "val_accuracy" in e), key=lambda e: (e["val_accuracy"], e["step"]))
            (output_dir / BEST_NAME).replace(output_dir / FINAL_NAME)
            log(f"selected the step-{best['step']} stages (validation accuracy {best['val_accuracy']:.3f}) "
                f"as {FINAL_NAME}; the last step's are in {LAST_NAME}")
        else:
            write_checkpoint(output_dir / f"checkpoint-{step}", {
                "format": CHECKPOINT_FORMAT, **provenance, "settings": settings, "config": cfg.to_dict(),
                "pruning": pruning_checkpoint(pruning, **provenance, steps=step),
                "discriminator": accelerator.unwrap_model(discriminator).state_dict(),
                "gen_opt": gen_opt.state_dict(), "disc_opt": disc_opt.state_dict(),
                "generator": pruning.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "step": step, "history": history, "evals": evals,
            }, best=output_dir / BEST_NAME)
        write_json(output_dir / LOG_NAME, {"run_id": run_id, "config_fingerprint": fingerprint, "config": cfg.to_dict(),
                                           **base, "world_size": world, "torch_threads": torch.get_num_threads(),
                                           "step": step, "history": history,
                                           "evals": evals})

    def evaluate(step: int) -> None:
        # Inference runs at the end of the annealing schedule (hard assignment, hard top-k), whatever the
        # step: the stages are evaluated and saved as they would be used, so step 0 is a fair candidate.
        training_temperature, pruning.temperature = pruning.temperature, cfg.anneal.temperature_min
        pruning.eval()
        acc = split_accuracy(accelerator.unwrap_model(model), processor, eval_samples)
        trace = pruning.last_trace
        best = max((e["val_accuracy"] for e in evals if "val_accuracy" in e), default=-1.0)
        evals.append({"step": step, "val_accuracy": acc, "vision_tokens": trace.num_vision_tokens if trace else None})
        if acc >= best:
            save_torch(pruning_checkpoint(pruning, **provenance, steps=step), output_dir / BEST_NAME)
        pruning.train()
        pruning.temperature = training_temperature
        log(f"step {step}: validation accuracy (pruned, {args.eval_size} questions) {acc:.3f}"
            + (" (best so far)" if acc >= best else ""))

    if main_process:  # the first write of this run
        if args.overwrite:
            remove_run_files(output_dir, log=log)
        remove_leftovers(output_dir, log=log)
        output_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            saved_best = resume_path.parent / BEST_NAME
            if saved_best.is_file() and saved_best.resolve() != (output_dir / BEST_NAME).resolve():
                copy_atomic(saved_best, output_dir / BEST_NAME)
        if start_step == 0:
            unwrapped = accelerator.unwrap_model(model)
            with pruning.disabled():
                base_acc = split_accuracy(unwrapped, processor, eval_samples)
            evals.append({"step": 0, "unpruned_val_accuracy": base_acc})
            log(f"run {run_id[:8]}; unpruned base: validation accuracy {base_acc:.3f} ({args.eval_size} questions)")
            evaluate(0)  # the untrained stages are a candidate too
    skip = start_step * t_cfg.grad_accum_steps
    batches = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
    bar = tqdm(total=t_cfg.max_steps, initial=start_step, desc="train step", unit="step", disable=not main_process,
               dynamic_ncols=True)
    started = time.perf_counter()
    for step in range(start_step, t_cfg.max_steps):
        temperature = temperature_at(step, t_cfg.max_steps, cfg.anneal)
        pruning.temperature = temperature
        for _ in range(t_cfg.grad_accum_steps):
            batch = next(batches)
            question_mask = batch.pop("question_mask")
            labels = batch.pop("labels")
            answer_rows = answer_position_mask(labels)  # the rows the discriminator compares
            with accelerator.accumulate(model, discriminator):
                with torch.no_grad(), pruning.disabled(), eager_attention(accelerator.unwrap_model(model), distill):
                    real_out = model(**batch, output_hidden_states=True, output_attentions=distill)
                    real = real_out.hidden_states[layer].float()
                    teacher = (answer_attention_teacher(real_out.attentions, answer_rows, batch["input_ids"] == image_id)
                               if distill else None)
                    del real_out
                fake_out = model(**batch, output_hidden_states=True, vision_question_mask=question_mask)
                fake = fake_out.hidden_states[layer].float()
                trace = pruning.last_trace

                for _d in range(t_cfg.discriminator_steps):  # discriminator: real vs pruned (generator detached)
                    d_loss, _ = adversarial_losses(discriminator(real, answer_rows), discriminator(fake.detach(), answer_rows))
                    accelerator.backward(d_loss)
                    if o_cfg.grad_clip_norm > 0 and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(discriminator.parameters(), o_cfg.grad_clip_norm)
                    disc_opt.step()
                    disc_opt.zero_grad(set_to_none=True)

                # generator step: D frozen (its unwrapped module, outside DDP), gradients reach merger + pruners only
                disc = accelerator.unwrap_model(discriminator)
                disc.requires_grad_(False)
                d_fake = disc(fake, answer_rows)
                with torch.no_grad():
                    d_real = disc(real, answer_rows)
                disc.requires_grad_(True)
                _, g_adv = adversarial_losses(d_real, d_fake)
                parts = {"adv": g_adv, "task": task_loss(fake_out.logits, labels)}
                if cfg.loss.feature_match_weight > 0:
                    parts["feature_match"] = paired_feature_matching(real, fake, answer_rows)
                if distill:
                    parts["attention_distill"] = stage_distillation(trace, teacher)
                if trace.merger_output is not None:
                    parts["merge_sparsity"] = merge_sparsity_loss(trace.merger_output.assignment)
                if cfg.loss.budget_loss_weight > 0 and trace.keep:
                    targets, ratio = [], 1.0
                    for lyr in sorted(trace.keep):
                        ratio *= pruning.keep_ratios.get(lyr, 1.0)
                        targets.append(ratio * trace.num_vision_tokens[1 if trace.merge_keep is not None else 0] / trace.num_vision_tokens[0])
                    parts["budget"] = token_budget_loss([trace.keep[k] for k in sorted(trace.keep)], targets)
                g_loss = total_generator_loss(parts, cfg.loss)
                accelerator.backward(g_loss)
                if o_cfg.grad_clip_norm > 0 and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for g in gen_params for p in g["params"]], o_cfg.grad_clip_norm)
                gen_opt.step()
                gen_opt.zero_grad(set_to_none=True)

        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps - 1:
            record = {"step": step, "temperature": round(temperature, 5), "d_loss": d_loss.item(),
                      "g_total": g_loss.item(), **{f"g_{k}": v.item() for k, v in parts.items()},
                      "d_real_prob": torch.sigmoid(d_real).mean().item(),
                      "d_fake_prob": torch.sigmoid(d_fake.detach()).mean().item(),
                      "vision_tokens": trace.num_vision_tokens, "seconds": round(time.perf_counter() - started, 1)}
            history.append(record)
            bar.set_postfix(task=f"{record['g_task']:.3f}", adv=f"{record['g_adv']:.3f}", d=f"{record['d_loss']:.3f}",
                            T=f"{temperature:.2f}")
        bar.update(1)
        done = step + 1
        if t_cfg.eval_every and done % t_cfg.eval_every == 0 and done != t_cfg.max_steps:
            if main_process:
                evaluate(done)
        if t_cfg.save_every and done % t_cfg.save_every == 0 and done != t_cfg.max_steps:
            save(done)
    bar.close()
    pruning.temperature = cfg.anneal.temperature_min  # what the saved stages run at
    if main_process:
        evaluate(t_cfg.max_steps)
    save(t_cfg.max_steps)
    save(t_cfg.max_steps, final=True)
    if main_process:
        log(f"trained {t_cfg.max_steps - start_step} steps in {time.perf_counter() - started:.0f} s; "
            f"wrote {output_dir / FINAL_NAME} and {output_dir / LOG_NAME} (run {run_id[:8]})")
    return 0


if __name__ == "__main__":
    run_cli(main)
