#!/usr/bin/env python
"""Train system C's learned stages (token merger + pruner heads) adversarially on a frozen LLaVA-1.5.

The base model is frozen. Each step, on a batch of the shapes-VQA training split:

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

    python scripts/train_llava_pruner.py                         # tiny shapes-VQA base (trained if missing)
    python scripts/train_llava_pruner.py --model-path /path/llava-1.5-7b-hf --max-steps 2000
    python scripts/train_llava_pruner.py --resume                # continue the latest checkpoint
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from cli import REPO_ROOT, ArgumentParser, UserError, load_or_explain, run_cli, write_json

import torch

DEFAULT_CONFIG = REPO_ROOT / "configs" / "vision_token_pruning.yaml"
FINAL_NAME = "pruning_final.pt"
LAST_NAME = "pruning_last.pt"
BEST_NAME = "pruning_best.pt"  # written whenever the validation accuracy improves; renamed to FINAL_NAME
LOG_NAME = "train_log.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_overrides(items: list[str]) -> dict:
    """``["lr_merger=1e-3", "keep_ratios=[0.5,0.5,0.5]"]`` -> flat config keys (YAML values)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_training_config(path: Path, overrides: dict, max_steps: int | None, output_dir: Path | None):
    """The YAML config with ``--set`` overrides and the CLI's train settings applied (validated)."""
    import yaml

    from pruning.llava.config import ConfigError, config_from_dict, load_config

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
        raise UserError(str(error)) from None
    except (ConfigError, yaml.YAMLError) as error:
        raise UserError(str(error)) from None


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*/state.pt"), key=lambda p: int(p.parent.name.split("-")[1]))
    return found[-1] if found else None


@torch.no_grad()
def split_accuracy(model, processor, samples) -> float:
    from data.vqa_shapes import accuracy_by_type, generate_answers

    return accuracy_by_type(samples, generate_answers(model, processor, samples))["all"]


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--model-path", default=None,
                        help="frozen LLaVA-1.5 directory (default: the tiny shapes-VQA base, trained if missing)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--output-dir", type=Path, default=None, help="override train.output_dir")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from a checkpoint (a checkpoint-<step> dir or state.pt; no value: the latest)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set lr_pruners=1e-3 (repeatable)")
    parser.add_argument("--eval-size", type=int, default=200, help="validation questions per periodic eval")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="base model weights (auto: float32 on CPU, bfloat16 on GPU)")
    args = parser.parse_args()
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.eval_size < 1:
        raise UserError(f"--eval-size must be >= 1, got {args.eval_size}")
    cfg = load_training_config(args.config, parse_overrides(args.set), args.max_steps, args.output_dir)
    output_dir = Path(cfg.train.output_dir)
    if not output_dir.is_absolute():
        output_dir = REPO_ROOT / output_dir
    resume_path = None
    if args.resume is not None:
        resume_path = latest_checkpoint(output_dir) if args.resume == "latest" else Path(args.resume)
        if resume_path is not None and resume_path.is_dir():
            resume_path = resume_path / "state.pt"
        if resume_path is None or not resume_path.is_file():
            raise UserError(f"--resume: no checkpoint found ({args.resume if args.resume != 'latest' else output_dir})")
    return train(args, cfg, output_dir, resume_path)


def train(args, cfg, output_dir: Path, resume_path: Path | None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from models.llava.modeling_llava import LlavaForConditionalGeneration
    from pruning.llava.config import temperature_at
    from pruning.llava.modules import (
        Discriminator,
        adversarial_losses,
        answer_position_mask,
        merge_sparsity_loss,
        task_loss,
        token_budget_loss,
        total_generator_loss,
    )
    from pruning.llava.runtime import attach_pruning, pruning_checkpoint
    from data.vqa_shapes import VQACollator, VQADataset, make_split

    t_cfg, o_cfg = cfg.train, cfg.optim
    accelerator = Accelerator(
        mixed_precision=t_cfg.mixed_precision,
        gradient_accumulation_steps=t_cfg.grad_accum_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(t_cfg.seed)
    main_process = accelerator.is_main_process
    log = accelerator.print

    model_path = args.model_path
    if model_path is None:
        from models.tiny.llava_vqa import trained_base_dir

        with accelerator.main_process_first():
            model_path = str(trained_base_dir(log=log))
    dtype = DTYPES.get(args.dtype) if args.dtype != "auto" else (
        torch.float32 if accelerator.device.type == "cpu" else torch.bfloat16)
    processor = load_or_explain("the LLaVA processor", model_path, lambda: AutoProcessor.from_pretrained(model_path))
    model = load_or_explain("the LLaVA model", model_path,
                            lambda: LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype))
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

    world = accelerator.num_processes
    per_step = t_cfg.batch_size * t_cfg.grad_accum_steps * world
    dataset = VQADataset("train", t_cfg.max_steps * per_step, seed=t_cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t_cfg.batch_size, shuffle=False,
                                         collate_fn=VQACollator(processor, with_answers=True))
    model, gen_opt, discriminator, disc_opt, loader = accelerator.prepare(model, gen_opt, discriminator, disc_opt, loader)
    layer = cfg.discriminator.discriminator_hidden_layer

    start_step, history, evals = 0, [], []
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        pruning.load_state_dict(state["pruning"]["state_dict"])
        accelerator.unwrap_model(discriminator).load_state_dict(state["discriminator"])
        gen_opt.load_state_dict(state["gen_opt"])
        disc_opt.load_state_dict(state["disc_opt"])
        pruning.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_step, history, evals = state["step"], state["history"], state["evals"]
        saved_best = resume_path.parent / BEST_NAME
        if saved_best.is_file() and saved_best.resolve() != (output_dir / BEST_NAME).resolve():
            output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved_best, output_dir / BEST_NAME)
        log(f"resumed from {resume_path} at step {start_step}")
        if start_step >= t_cfg.max_steps:
            raise UserError(f"checkpoint is at step {start_step}, already >= max_steps={t_cfg.max_steps}")
    eval_samples = make_split("val", args.eval_size, seed=t_cfg.seed)

    def save(step: int, final: bool = False) -> None:
        accelerator.wait_for_everyone()
        if not main_process:
            return
        ckpt = pruning_checkpoint(pruning)
        if final:
            torch.save({**ckpt, "base_model": model_path, "steps": step}, output_dir / LAST_NAME)
            best = max((e for e in evals if "val_accuracy" in e), key=lambda e: (e["val_accuracy"], e["step"]))
            (output_dir / BEST_NAME).replace(output_dir / FINAL_NAME)
            log(f"selected the step-{best['step']} stages (validation accuracy {best['val_accuracy']:.3f}) "
                f"as {FINAL_NAME}; the last step's are in {LAST_NAME}")
        else:
            folder = output_dir / f"checkpoint-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({
                "pruning": ckpt, "discriminator": accelerator.unwrap_model(discriminator).state_dict(),
                "gen_opt": gen_opt.state_dict(), "disc_opt": disc_opt.state_dict(),
                "generator": pruning.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "step": step, "history": history, "evals": evals,
            }, folder / "state.pt")
            if (output_dir / BEST_NAME).is_file():  # the best-so-far stages travel with the checkpoint
                shutil.copyfile(output_dir / BEST_NAME, folder / BEST_NAME)
        write_json(output_dir / LOG_NAME, {"config": cfg.to_dict(), "base_model": model_path, "world_size": world,
                                           "step": step, "history": history, "evals": evals})

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
            torch.save({**pruning_checkpoint(pruning), "base_model": model_path, "steps": step}, output_dir / BEST_NAME)
        pruning.train()
        pruning.temperature = training_temperature
        log(f"step {step}: validation accuracy (pruned, {args.eval_size} questions) {acc:.3f}"
            + (" (best so far)" if acc >= best else ""))

    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            unwrapped = accelerator.unwrap_model(model)
            with pruning.disabled():
                base_acc = split_accuracy(unwrapped, processor, eval_samples)
            evals.append({"step": 0, "unpruned_val_accuracy": base_acc})
            log(f"unpruned base: validation accuracy {base_acc:.3f} ({args.eval_size} questions)")
            evaluate(0)  # the untrained stages are a candidate too
    skip = start_step * t_cfg.grad_accum_steps
    batches = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
    bar = tqdm(range(start_step, t_cfg.max_steps), desc="train pruner", disable=not main_process, dynamic_ncols=True)
    started = time.perf_counter()
    for step in bar:
        temperature = temperature_at(step, t_cfg.max_steps, cfg.anneal)
        pruning.temperature = temperature
        for _ in range(t_cfg.grad_accum_steps):
            batch = next(batches)
            question_mask = batch.pop("question_mask")
            labels = batch.pop("labels")
            answer_rows = answer_position_mask(labels)  # the rows the discriminator compares
            with accelerator.accumulate(model, discriminator):
                with torch.no_grad(), pruning.disabled():
                    real = model(**batch, output_hidden_states=True).hidden_states[layer].float()
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
            f"wrote {output_dir / FINAL_NAME} and {output_dir / LOG_NAME}")
    return 0


if __name__ == "__main__":
    run_cli(main)
