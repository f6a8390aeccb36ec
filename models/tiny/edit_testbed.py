"""The embedded edit testbed: a Qwen-Image-Edit pipeline at toy size that has learned ``data.edit_task``.

Reference-token reuse can only be seen to cost (or not cost) quality on a model whose output depends on the
reference image. This module trains, on this CPU, the two components of the stock ``QwenImageEditPipeline`` that
make an edit, and assembles the pipeline that ``make run-edit`` and ``make eval-edit`` use:

1. **VAE** (:func:`train_vae`): the real ``AutoencoderKLQwenImage`` (z_dim 16, 8x downsampling, causal 3D convs)
   with 16 base channels, trained to reconstruct the task's 128x128 images: MSE through the posterior mean plus
   fixed Gaussian noise (``latent_noise``, so the decoder tolerates the transformer's small latent errors) and a
   small penalty on the mean's square (``latent_penalty``), plus a **thumbnail** loss: the first 3 latent channels
   must hold the image's colour averaged over each 8x8 px cell (``thumbnail_weight``). Without it the untrained
   encoder's latent explained ~25% of even that coarse colour (linear fit), the decoder learned nothing from it, and
   the reconstruction stayed at the mean colour for hundreds of steps at any learning rate; the decoder alone,
   given the thumbnail, learned at once. Learning rates of 1e-3 and more stall these RMS-normed convs too.
   The pipeline always encodes with the posterior mode (no sampling, hence no KL term). Its ``latents_mean`` / ``latents_std`` are then measured on training images and written to
   its config, so the pipeline's own normalisation gives unit-variance latents.
2. **Transformer** (:func:`train_transformer`): the real ``QwenImageTransformer2DModel`` at toy size, trained by
   flow matching on exactly what the stock pipeline feeds it: the packed noisy target latents concatenated with
   the packed source-image latents (``[B, L_denoise + L_reference, 64]``), the instruction embedded by the
   (frozen, seeded) toy Qwen2.5-VL text encoder through the pipeline's own ``encode_prompt`` (the reference image
   in the prompt too), ``img_shapes`` for the two grids, and the timestep. The noise levels are those of 4-step
   sampling with the Lightning scheduler settings (``LIGHTNING_SCHEDULER_CONFIG``: sigmas 1, 0.9, 0.75, 0.5),
   half the time, and uniform otherwise. Because the target is a deterministic function of the source and the
   instruction, the velocity's optimum is exact at every noise level and 4 Euler steps suffice.

The testbed runs at 128x128 output and reference: the stock pipeline resizes every reference to ~1024x1024 px of
area whatever the output size, so the pipelines take ``reference_area`` (upstream's 1024 * 1024 by default) and
the embedded default passes ``REFERENCE_AREA`` (128 * 128). The prompt embeddings, source and target latents of
the training edits are computed once (:func:`encode_edits`) and cached.

The assembled directory (``models/trained/qwenimage_edit``, diffusers layout, every component loaded with
``from_pretrained``) is shipped in the repository with its training record, so a fresh clone needs no training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from models.tiny.training import lr_factor, optimizer_step, resume_checkpoint, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "models" / "trained" / "qwenimage_edit"
WORK_DIR = REPO_ROOT / "runs" / "edit_base"
RECORD_FILE = "training_record.json"
IMAGE_SIZE = 128
REFERENCE_AREA = IMAGE_SIZE * IMAGE_SIZE
"""The embedded testbed's reference area (px): the reference is encoded at 128x128, like the output."""
NUM_STEPS = 4
"""Sampling steps of the testbed (Lightning's 4-step setting)."""
DEMO_EDIT_INDEX = 2
"""The held-out test edit ``make run-edit`` shows by default: ``data.edit_task.make_edit(0, "test", 2)``, a recolour."""

VAE_DEFAULTS = dict(vae_steps=1500, vae_batch_size=8, vae_lr=3e-4, latent_noise=0.1, latent_penalty=1e-4,
                    thumbnail_weight=1.0, vae_base_dim=16)
TRANSFORMER_DEFAULTS = dict(steps=4500, batch_size=32, lr=8e-4, warmup=100, weight_decay=0.01, num_layers=4,
                            num_heads=4, train_edits=16000, lightning_fraction=0.5, edit_weight=4.0, clip=1.0)
EDITED_TOKEN_THRESHOLD = 0.05
"""A latent token counts as edited when its mean squared change from source to target exceeds this (unedited
tokens: median 1e-4; edited: ~0.5 and more, in units of the normalised latents)."""
SHARED_DEFAULTS = dict(seed=0, eval_size=64, eval_every=250)


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL RGB images -> ``[B, 3, 1, H, W]`` in [-1, 1] (the pipeline's ``VaeImageProcessor.preprocess`` range)."""
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).unsqueeze(2)


def tensor_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``[B, 3, 1, H, W]`` tensors in [-1, 1] (clamped), peak 1 on [0, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ============================================================================= VAE


def vae_config(base_dim: int) -> dict:
    from models.tiny.qwenimage_edit import tiny_vae_config

    return {**tiny_vae_config(), "base_dim": base_dim}


def _vae_batch(seed: int, split: str, step: int, batch_size: int) -> torch.Tensor:
    """Source and target images of consecutive edits (half each): the images the pipeline will encode and decode."""
    from data.edit_task import make_edit

    images = []
    for i in range(batch_size):
        sample = make_edit(seed, split, step * batch_size + i)
        images.append(sample.target_image() if i % 2 else sample.source_image())
    return images_to_tensor(images)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` for one frame (``z``: ``[B, 16, 1, h, w]``) without its final clamp to [-1, 1], whose
    zero gradient outside that range stalls training (the untrained decoder's outputs mostly lie outside it)."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


@torch.no_grad()
def evaluate_vae(vae, seed: int, size: int) -> dict:
    """Reconstruction PSNR (mean, standard error) of the first ``size`` validation images, through the posterior mode."""
    was_training = vae.training
    vae.eval()
    scores = []
    for start in range(0, size, 16):
        x = _vae_batch(seed, "val", start // 16, min(16, size - start))
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores.append(tensor_psnr(y, x))
    vae.train(was_training)
    scores = torch.cat(scores)
    return {"psnr": round(scores.mean().item(), 3), "psnr_se": round((scores.std() / math.sqrt(len(scores))).item(), 3),
            "size": size}


@torch.no_grad()
def measure_latent_statistics(vae, seed: int, num_images: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over training images (the config's ``latents_mean/std``)."""
    latents = []
    for start in range(0, num_images, 16):
        latents.append(vae.encode(_vae_batch(seed + 1, "train", start // 16, 16)).latent_dist.mode())
    z = torch.cat(latents).transpose(0, 1).flatten(1)  # [z_dim, N]
    return [round(v, 5) for v in z.mean(1).tolist()], [round(v, 5) for v in z.std(1).tolist()]


def train_vae(output_dir: Path, *, vae_steps: int, vae_batch_size: int, vae_lr: float, latent_noise: float,
              latent_penalty: float, thumbnail_weight: float, vae_base_dim: int, seed: int, eval_size: int, eval_every: int, checkpoint: Path, resume: bool = False,
              log=print) -> dict:
    """Train the VAE from a seeded init; PSNR on validation images every ``eval_every`` steps into the JSON log.

    ``checkpoint`` (model, optimizer, schedule, step, log) is written atomically at every evaluation; ``resume``
    continues from it on exactly the batches the uninterrupted run would have seen (a batch is a function of the
    step). The trained VAE (with measured latent statistics) and its record go to ``output_dir``.
    """
    from diffusers import AutoencoderKLQwenImage
    from tqdm.auto import tqdm

    from cli import atomic_path, write_json

    settings = dict(vae_steps=vae_steps, vae_batch_size=vae_batch_size, vae_lr=vae_lr, latent_noise=latent_noise,
                    latent_penalty=latent_penalty, thumbnail_weight=thumbnail_weight,
                    vae_base_dim=vae_base_dim, seed=seed, eval_size=eval_size, eval_every=eval_every)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**vae_config(vae_base_dim))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = min(20, vae_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, vae_steps, warmup))
    record = {"settings": settings, "num_parameters": sum(p.numel() for p in vae.parameters()), "evaluations": [],
              "loss_every_10_steps": [], "train_seconds": 0.0}
    start_step = 0
    if resume and Path(checkpoint).is_file():
        record, start_step = resume_checkpoint(checkpoint, modules={"model": vae}, optimizer=optimizer,
                                               scheduler=scheduler, settings=settings, log=log)
    vae.train()
    generator = torch.Generator().manual_seed(seed)
    begin = time.perf_counter() - record["train_seconds"]
    window, kl_window = [], []
    bar = tqdm(range(start_step, vae_steps), desc="vae step", unit="step", initial=start_step, total=vae_steps,
               dynamic_ncols=True)
    for step in bar:
        x = _vae_batch(seed, "train", step, vae_batch_size)
        mean = vae.encode(x).latent_dist.mean
        generator.manual_seed(seed * 1_000_003 + step)  # the latent noise: a function of the step too
        y = decode_unclamped(vae, mean + latent_noise * torch.randn(mean.shape, generator=generator))
        reconstruction = (y - x).pow(2).mean()
        penalty = mean.pow(2).mean()
        # the first 3 latent channels hold the image's 8x8-pooled colour: informative latents from the first steps
        thumbnail = (mean[:, :3, 0] - torch.nn.functional.avg_pool2d(x[:, :, 0], 8)).pow(2).mean()
        loss = reconstruction + latent_penalty * penalty + thumbnail_weight * thumbnail
        optimizer_step(loss, optimizer, scheduler, vae.parameters(), clip=1.0)
        window.append(reconstruction.item())
        kl_window.append(penalty.item())
        if (step + 1) % 10 == 0:
            mse = sum(window) / len(window)
            record["loss_every_10_steps"].append({"step": step + 1, "mse": round(mse, 6),
                                                  "latent_mean_square": round(sum(kl_window) / len(kl_window), 4)})
            bar.set_postfix(mse=f"{mse:.5f}", psnr=f"{10 * math.log10(4 / max(mse, 1e-10)):.1f}")
            window, kl_window = [], []
        if (step + 1) % eval_every == 0 or step + 1 == vae_steps:
            record["train_seconds"] = round(time.perf_counter() - begin, 1)
            result = {"step": step + 1, "train_seconds": record["train_seconds"], **evaluate_vae(vae, seed, eval_size)}
            record["evaluations"].append(result)
            log(f"step {step + 1}: validation PSNR {result['psnr']:.2f} dB")
            save_checkpoint(checkpoint, modules={"model": vae}, optimizer=optimizer, scheduler=scheduler,
                            step=step + 1, record=record, settings=settings)
    record["train_seconds"] = round(time.perf_counter() - begin, 1)
    vae.eval()
    mean, std = measure_latent_statistics(vae, seed)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    record["latents_mean"], record["latents_std"] = mean, std
    record["validation_psnr"] = record["evaluations"][-1]["psnr"]
    with atomic_path(Path(output_dir)) as tmp:
        tmp.mkdir()
        vae.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, record)
    return record


# ============================================================================= pipeline parts


def build_tokenizer():
    """The tiny Qwen2 tokenizer with the task's instructions in its BPE corpus (every instruction word one token)."""
    from data.edit_task import instruction_lines
    from models.tiny.qwen_tokenizer import build_qwen2_tokenizer

    return build_qwen2_tokenizer(extra_lines=instruction_lines())


def build_text_encoder(tokenizer):
    """The frozen text encoder: the seeded toy Qwen2.5-VL of the embedded pipeline (not trained; the transformer
    learns to read its hidden states)."""
    from models.tiny.qwen2_5_vl import build_seeded_qwen2_5_vl
    from models.tiny.qwenimage_edit import TEXT_ENCODER_SEED

    return build_seeded_qwen2_5_vl(tokenizer, seed=TEXT_ENCODER_SEED).eval()


def transformer_config(num_layers: int, num_heads: int, joint_attention_dim: int, zero_cond_t: bool) -> dict:
    from models.tiny.qwenimage_edit import tiny_transformer_config

    return {**tiny_transformer_config(joint_attention_dim, zero_cond_t), "num_layers": num_layers,
            "num_attention_heads": num_heads}


def lightning_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.qwenimage_edit import LIGHTNING_SCHEDULER_CONFIG

    return FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)


def lightning_sigmas(num_steps: int = NUM_STEPS) -> torch.Tensor:
    """The noise levels a ``num_steps`` Lightning sampling visits (the pipeline's sigmas, then the time shift)."""
    scheduler = lightning_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=math.log(3))
    return scheduler.sigmas[:num_steps].float()


def build_pipeline(vae, transformer, tokenizer=None, text_encoder=None):
    """``TokenPruningQwenImageEditPipeline`` from a VAE and a forked transformer (tokenizer and text encoder built if
    not given), with the Lightning scheduler settings."""
    from models.tiny.qwenimage_edit import build_qwen2_vl_processor
    from pipelines.qwenimage_edit import TokenPruningQwenImageEditPipeline

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(tokenizer)
    pipe = TokenPruningQwenImageEditPipeline(
        scheduler=lightning_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        processor=build_qwen2_vl_processor(tokenizer), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_edits(pipe, samples: Sequence, batch_size: int = 32, progress: bool = True) -> dict:
    """What the stock pipeline computes before denoising, for each edit: the prompt embedding (instruction and
    reference image through ``encode_prompt``; ``[L_text, D]``, unpadded, float16), and the packed, normalised
    latents of the source (the reference tokens) and of the target (``[L, 64]`` each, float16)."""
    from tqdm.auto import tqdm

    embeds, sources, targets = [], [], []
    chunks = range(0, len(samples), batch_size)
    for start in tqdm(chunks, desc="encode edits", unit="batch", disable=not progress, dynamic_ncols=True):
        chunk = samples[start:start + batch_size]
        images = [s.source_image() for s in chunk]
        prompt_embeds, mask = pipe.encode_prompt(image=images, prompt=[s.instruction for s in chunk], device="cpu",
                                                 num_images_per_prompt=1)
        embeds += [e[:int(m.sum())].half() for e, m in zip(prompt_embeds, mask)]
        for pictures, out in ((images, sources), ([s.target_image() for s in chunk], targets)):
            pixels = pipe.image_processor.preprocess(pictures, IMAGE_SIZE, IMAGE_SIZE).unsqueeze(2)
            latents = pipe._encode_vae_image(pixels, generator=None)  # [B, 16, 1, 16, 16], normalised
            packed = pipe._pack_latents(latents, len(chunk), latents.shape[1], latents.shape[3], latents.shape[4])
            out.append(packed.half())
    return {"prompt_embeds": embeds, "source": torch.cat(sources), "target": torch.cat(targets)}


def pad_embeds(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[L_i, D]`` embeddings to ``[B, max L, D]`` with the mask the stock ``encode_prompt`` returns."""
    length = max(e.shape[0] for e in embeds)
    padded = torch.zeros(len(embeds), length, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        padded[i, :e.shape[0]] = e.float()
        mask[i, :e.shape[0]] = 1
    return padded, mask


def flow_matching_loss(transformer, batch: dict, sigma: torch.Tensor, noise: torch.Tensor, grid: int,
                       edit_weight: float = 0.0) -> torch.Tensor:
    """The rectified-flow loss on the stock pipeline's inputs: ``x_t = (1 - sigma) x_0 + sigma noise``, the transformer
    sees ``[x_t ; reference latents]`` (``[B, L_denoise + L_reference, 64]``) and must predict ``noise - x_0`` on the
    denoise rows (the scheduler's Euler step then moves ``x_t`` along it). Tokens the edit changes (source and target
    latents differ, ``EDITED_TOKEN_THRESHOLD``) weigh ``1 + edit_weight``, the others 1 (a weighted mean)."""
    x0 = batch["target"]
    xt = (1 - sigma)[:, None, None] * x0 + sigma[:, None, None] * noise
    hidden = torch.cat([xt, batch["source"]], dim=1)
    embeds, mask = batch["prompt_embeds"], batch["prompt_embeds_mask"]
    prediction = transformer(hidden_states=hidden, timestep=sigma, encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, img_shapes=[[(1, grid, grid), (1, grid, grid)]] * len(x0),
                             return_dict=False)[0][:, :x0.shape[1]]
    error = (prediction - (noise - x0)).pow(2).mean(-1)  # [B, L_denoise]
    edited = (x0 - batch["source"]).pow(2).mean(-1) > EDITED_TOKEN_THRESHOLD
    weight = 1 + edit_weight * edited.float()
    return (weight * error).sum() / weight.sum()


# ============================================================================= evaluation


def edit_scores(sample, output) -> dict:
    """PSNR / SSIM of an output image against the edit's target, and whether a recolour edit's shape has the asked
    colour (None for other types)."""
    from data.edit_task import mask_colour
    from evaluation.metrics import psnr, ssim

    target = sample.target_image()
    scores = {"psnr": psnr(output, target), "ssim": ssim(output, target)}
    scores["colour_right"] = (mask_colour(output, sample.asked_mask()) == sample.new_colour
                              if sample.edit_type == "recolour" else None)
    return scores


def summarise(values: Sequence[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": round(float(values.mean()), 4), "se": round(se, 4), "n": int(len(values))}


def score_report(samples: Sequence, scores: Sequence[dict]) -> dict:
    """Mean and standard error of PSNR / SSIM against the target, overall and per edit type; recolour accuracy."""
    from data.edit_task import EDIT_TYPES

    report = {"all": {"psnr": summarise([s["psnr"] for s in scores]), "ssim": summarise([s["ssim"] for s in scores])}}
    for edit_type in EDIT_TYPES:
        chosen = [s for sample, s in zip(samples, scores) if sample.edit_type == edit_type]
        if chosen:
            report[edit_type] = {"psnr": summarise([s["psnr"] for s in chosen]),
                                 "ssim": summarise([s["ssim"] for s in chosen])}
    colour = [s["colour_right"] for s in scores if s["colour_right"] is not None]
    if colour:
        report["recolour"]["colour_accuracy"] = summarise([float(c) for c in colour])
    return report


def run_edit(pipe, sample, seed: int = 0, **kwargs):
    """The testbed's edit of ``sample``: 4 Lightning steps at 128x128, reference at 128x128, noise from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    call = dict(image=sample.source_image(), prompt=sample.instruction, height=IMAGE_SIZE, width=IMAGE_SIZE,
                num_inference_steps=NUM_STEPS, reference_area=REFERENCE_AREA, true_cfg_scale=1.0,
                generator=generator)
    return pipe(**{**call, **kwargs}).images[0]


@torch.no_grad()
def evaluate_pipeline(pipe, split: str, size: int, seed: int, **kwargs) -> dict:
    """The pipeline's edits of the first ``size`` edits of ``split`` scored against their targets (``score_report``),
    next to returning the source unchanged (``identity``)."""
    from data.edit_task import make_split
    from evaluation.metrics import psnr, ssim

    samples = make_split(split, size, seed=seed)
    scores = [edit_scores(sample, run_edit(pipe, sample, seed=i, **kwargs)) for i, sample in enumerate(samples)]
    identity = [{"psnr": psnr(s.source_image(), s.target_image()), "ssim": ssim(s.source_image(), s.target_image()),
                 "colour_right": None} for s in samples]
    return {"split": split, "size": size, "model": score_report(samples, scores),
            "identity": score_report(samples, identity)}


# ============================================================================= transformer


def train_transformer(output_dir: Path, *, vae_dir: Path, cache: Path, steps: int, batch_size: int, lr: float,
                      warmup: int, weight_decay: float, num_layers: int, num_heads: int, train_edits: int,
                      lightning_fraction: float, edit_weight: float, clip: float, seed: int, eval_size: int, eval_every: int,
                      checkpoint: Path, resume: bool = False, zero_cond_t: bool = False, init_from: Path | None = None,
                      log=print) -> dict:
    """Train the forked ``QwenImageTransformer2DModel`` by flow matching on ``train_edits`` encoded training edits.

    Every ``eval_every`` steps the whole pipeline (4 Lightning steps) edits ``eval_size`` validation edits: PSNR
    against the target per type and recolour accuracy go to the JSON log beside ``checkpoint``, which is written
    atomically then; ``resume`` continues from it (a batch, its noise and noise levels are functions of the step).
    """
    from diffusers import AutoencoderKLQwenImage
    from tqdm.auto import tqdm

    from cli import atomic_path, save_torch, write_json
    from data.edit_task import make_split
    from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel

    settings = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                    num_layers=num_layers, num_heads=num_heads, train_edits=train_edits,
                    lightning_fraction=lightning_fraction, edit_weight=edit_weight, clip=clip, seed=seed, eval_size=eval_size,
                    eval_every=eval_every, zero_cond_t=zero_cond_t, init_from=str(init_from) if init_from else None)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage.from_pretrained(vae_dir).eval()
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    config = transformer_config(num_layers, num_heads, text_encoder.config.text_config.hidden_size, zero_cond_t)
    transformer = QwenImageTransformer2DModel(**config)
    if init_from is not None:
        start = QwenImageTransformer2DModel.from_pretrained(init_from)
        transformer.load_state_dict(start.state_dict())
    pipe = build_pipeline(vae, transformer, tokenizer, text_encoder)

    key = {"seed": seed, "train_edits": train_edits, "vae": str(Path(vae_dir).resolve())}
    if Path(cache).is_file() and torch.load(cache, map_location="cpu", weights_only=False).get("key") == key:
        encoded = torch.load(cache, map_location="cpu", weights_only=False)
        log(f"encoded training edits loaded from {cache}")
    else:
        encoded = encode_edits(pipe, make_split("train", train_edits, seed=seed))
        encoded["key"] = key
        save_torch(encoded, Path(cache))
    grid = IMAGE_SIZE // 16
    sigmas = lightning_sigmas()

    optimizer = torch.optim.AdamW(
        [{"params": [p for p in transformer.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in transformer.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    record = {"settings": settings, "transformer_config": config,
              "num_parameters": sum(p.numel() for p in transformer.parameters()),
              "lightning_sigmas": [round(s, 4) for s in sigmas.tolist()], "evaluations": [],
              "loss_every_10_steps": [], "train_seconds": 0.0}
    start_step = 0
    if resume and Path(checkpoint).is_file():
        record, start_step = resume_checkpoint(checkpoint, modules={"model": transformer}, optimizer=optimizer,
                                               scheduler=scheduler, settings=settings, log=log)
    transformer.train()
    begin = time.perf_counter() - record["train_seconds"]
    window = []
    bar = tqdm(range(start_step, steps), desc="transformer step", unit="step", initial=start_step, total=steps,
               dynamic_ncols=True)
    for step in bar:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(train_edits, (batch_size,), generator=generator)
        embeds, mask = pad_embeds([encoded["prompt_embeds"][i] for i in index.tolist()])
        batch = {"prompt_embeds": embeds, "prompt_embeds_mask": mask,
                 "source": encoded["source"][index].float(), "target": encoded["target"][index].float()}
        lightning = torch.rand(batch_size, generator=generator) < lightning_fraction
        sigma = torch.where(lightning, sigmas[torch.randint(len(sigmas), (batch_size,), generator=generator)],
                            torch.rand(batch_size, generator=generator))
        noise = torch.randn(batch["target"].shape, generator=generator)
        loss = flow_matching_loss(transformer, batch, sigma, noise, grid, edit_weight)
        optimizer_step(loss, optimizer, scheduler, transformer.parameters(), clip)
        window.append(loss.item())
        if (step + 1) % 10 == 0:
            record["loss_every_10_steps"].append({"step": step + 1, "loss": round(sum(window) / len(window), 5)})
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            window = []
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            record["train_seconds"] = round(time.perf_counter() - begin, 1)
            transformer.eval()
            result = evaluate_pipeline(pipe, "val", eval_size, seed)
            transformer.train()
            result.update(step=step + 1, train_seconds=record["train_seconds"])
            record["evaluations"].append(result)
            model = result["model"]
            log(f"step {step + 1}: validation PSNR vs target {model['all']['psnr']['mean']:.2f} dB (identity "
                f"{result['identity']['all']['psnr']['mean']:.2f}), recolour colour right "
                f"{model.get('recolour', {}).get('colour_accuracy', {}).get('mean', float('nan')):.2f}; "
                + " ".join(f"{t} {v['psnr']['mean']:.1f}" for t, v in model.items() if t != "all"))
            save_checkpoint(checkpoint, modules={"model": transformer}, optimizer=optimizer, scheduler=scheduler,
                            step=step + 1, record=record, settings=settings)
    record["train_seconds"] = round(time.perf_counter() - begin, 1)
    record["validation_psnr"] = record["evaluations"][-1]["model"]["all"]["psnr"]["mean"]
    with atomic_path(Path(output_dir)) as tmp:
        tmp.mkdir()
        transformer.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, record)
    return record


# ============================================================================= the shipped pipeline

ZERO_COND_T_SUBFOLDER = "transformer_zero_cond_t"
"""The Qwen-Image-Edit-2511 variant's transformer, shipped beside the pipeline's own (same VAE, text encoder)."""


def assemble(work_dir: Path, output_dir: Path) -> None:
    """Write the trained pipeline in the diffusers layout of ``Qwen/Qwen-Image-Edit`` to ``output_dir``.

    Components: the trained VAE and transformer (saved as diffusers' own ``QwenImageTransformer2DModel``, the class
    ``model_index.json`` names; the weights are the fork's, whose parameters are upstream's), the seeded text encoder,
    the tokenizer with the task's words, the ``Qwen2VLProcessor`` and the Lightning scheduler settings; the
    ``zero_cond_t`` transformer in ``transformer_zero_cond_t/`` when it was trained; the training records of every
    stage in ``training_record.json`` and how it was made in ``README.md``.
    """
    import json

    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImageTransformer2DModel

    from cli import atomic_path, write_json
    from models.tiny.qwenimage_edit import build_qwen2_vl_processor

    work_dir = Path(work_dir)
    vae = AutoencoderKLQwenImage.from_pretrained(work_dir / "vae")
    tokenizer = build_tokenizer()
    pipe = QwenImageEditPipeline(
        scheduler=lightning_scheduler(), vae=vae, text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer,
        processor=build_qwen2_vl_processor(tokenizer),
        transformer=QwenImageTransformer2DModel.from_pretrained(work_dir / "transformer"))
    records = {"vae": json.loads((work_dir / "vae" / RECORD_FILE).read_text()),
               "transformer": json.loads((work_dir / "transformer" / RECORD_FILE).read_text())}
    with atomic_path(Path(output_dir)) as tmp:
        tmp.mkdir()
        pipe.save_pretrained(tmp)
        if (work_dir / ZERO_COND_T_SUBFOLDER / "config.json").is_file():
            QwenImageTransformer2DModel.from_pretrained(work_dir / ZERO_COND_T_SUBFOLDER).save_pretrained(
                tmp / ZERO_COND_T_SUBFOLDER)
            records["transformer_zero_cond_t"] = json.loads((work_dir / ZERO_COND_T_SUBFOLDER / RECORD_FILE).read_text())
        write_json(tmp / RECORD_FILE, records)
        (tmp / "README.md").write_text(shipped_readme(records))


def shipped_readme(records: dict) -> str:
    """How the shipped pipeline was made: commands, seeds, steps, times, validation scores (from the records)."""
    vae, transformer = records["vae"], records["transformer"]
    last = transformer["evaluations"][-1]
    lines = [
        "# Embedded Qwen-Image-Edit testbed (trained on the generated edit task)",
        "",
        "The stock `QwenImageEditPipeline` layout at toy size, trained on this CPU on `data/edit_task.py` "
        "(128x128 scenes of coloured shapes; recolour, remove, add, move, background edits). "
        "`models/tiny/edit_testbed.py` says what each stage trains and why. Load it with "
        "`TokenPruningQwenImageEditPipeline.from_pretrained(this directory)` and edit at 128x128 with "
        "`reference_area=128 * 128`, 4 steps (Lightning scheduler settings, the shipped scheduler).",
        "",
        "Made with `make train-edit-base` (= `python scripts/train_edit_base.py`; stages `vae`, `transformer`, "
        "`assemble`).",
        "",
        "| stage | settings | steps | seconds | validation |",
        "|---|---|---|---|---|",
        f"| VAE ({vae['num_parameters']:,} parameters) | `{vae['settings']}` | {vae['settings']['vae_steps']} | "
        f"{vae['train_seconds']:.0f} | reconstruction PSNR {vae['validation_psnr']:.2f} dB |",
        f"| transformer ({transformer['num_parameters']:,} parameters) | `{transformer['settings']}` | "
        f"{transformer['settings']['steps']} | {transformer['train_seconds']:.0f} | PSNR vs target "
        f"{last['model']['all']['psnr']['mean']:.2f} dB (returning the input: {last['identity']['all']['psnr']['mean']:.2f} dB), "
        f"recolour colour right {last['model'].get('recolour', {}).get('colour_accuracy', {}).get('mean', float('nan')):.2f} |",
    ]
    if "transformer_zero_cond_t" in records:
        zero = records["transformer_zero_cond_t"]
        z_last = zero["evaluations"][-1]
        lines.append(
            f"| transformer, `zero_cond_t` (Edit-2511; `{ZERO_COND_T_SUBFOLDER}/`) | `{zero['settings']}` | "
            f"{zero['settings']['steps']} | {zero['train_seconds']:.0f} | PSNR vs target "
            f"{z_last['model']['all']['psnr']['mean']:.2f} dB, recolour colour right "
            f"{z_last['model'].get('recolour', {}).get('colour_accuracy', {}).get('mean', float('nan')):.2f} |")
    lines += ["", "Validation: the first edits of the `val` split, the whole pipeline (4 steps) from seed i for edit i. "
              "The full per-evaluation log is `training_record.json`.", ""]
    return "\n".join(lines)


def shipped_pipeline(zero_cond_t: bool = False, path: Path | None = None):
    """The shipped testbed as ``TokenPruningQwenImageEditPipeline`` (``zero_cond_t``: with the Edit-2511 transformer)."""
    from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel
    from pipelines.qwenimage_edit import TokenPruningQwenImageEditPipeline

    path = Path(path or SHIPPED_DIR)
    kwargs = {}
    if zero_cond_t:
        kwargs["transformer"] = QwenImageTransformer2DModel.from_pretrained(path, subfolder=ZERO_COND_T_SUBFOLDER)
    pipe = TokenPruningQwenImageEditPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
