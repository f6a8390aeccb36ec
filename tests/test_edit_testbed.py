"""The trained edit testbed (models/tiny/edit_testbed.py, models/trained/qwenimage_edit): its parts, its training
loop (resumable), the shipped pipeline (loads with from_pretrained, edits as asked), and `reference_area`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.edit_task import make_edit, mask_colour
from models.tiny.edit_testbed import (
    DEMO_EDIT_INDEX,
    IMAGE_SIZE,
    RECORD_FILE,
    REFERENCE_AREA,
    SHIPPED_DIR,
    TRANSFORMER_DEFAULTS,
    VAE_DEFAULTS,
    ZERO_COND_T_SUBFOLDER,
    build_tokenizer,
    lightning_sigmas,
    run_edit,
    shipped_pipeline,
)


def test_every_instruction_word_is_one_token_and_the_edit_template_prefix_is_still_64_tokens():
    from data.edit_task import instruction_lines
    from models.tiny.qwen_tokenizer import QWENIMAGE_EDIT_TEMPLATE

    tokenizer = build_tokenizer()
    for line in instruction_lines()[::7]:  # each word (and the full stop) one token, as the line is written
        assert len(tokenizer(line, add_special_tokens=False)["input_ids"]) == len(line.split()) + 1, line
    prefix = QWENIMAGE_EDIT_TEMPLATE.split("<|im_start|>user")[0] + "<|im_start|>user\n"
    # diffusers' QwenImageEditPipeline drops prompt_template_encode_start_idx = 64 tokens: the system prefix
    assert len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) == 64


def test_lightning_sigmas_are_the_four_noise_levels_the_pipeline_visits():
    sigmas = lightning_sigmas()
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5]), atol=1e-4)
    pipe = shipped_pipeline()
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["timestep"][0])), with_kwargs=True)
    try:
        run_edit(pipe, make_edit(0, "test", 0))
    finally:
        hook.remove()
    assert np.allclose(seen, sigmas.numpy(), atol=1e-4)


def test_reference_area_encodes_the_reference_at_that_area_and_leaves_upstream_alone_outside_the_call():
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as stock

    pipe = shipped_pipeline()
    shapes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: shapes.append((tuple(k["hidden_states"].shape), k["img_shapes"][0])), with_kwargs=True)
    try:
        sample = make_edit(0, "test", 0)
        run_edit(pipe, sample, num_inference_steps=1)
        run_edit(pipe, sample, num_inference_steps=1, reference_area=REFERENCE_AREA // 4)
    finally:
        hook.remove()
    grid = IMAGE_SIZE // 16
    assert shapes[0] == ((1, 2 * grid * grid, 64), [(1, grid, grid), (1, grid, grid)])
    assert shapes[1] == ((1, grid * grid + grid * grid // 4, 64), [(1, grid, grid), (1, grid // 2, grid // 2)])
    assert stock.calculate_dimensions(1024 * 1024, 1.0)[:2] == (1024, 1024)  # upstream's answer outside a call


def test_a_bad_reference_area_is_one_line():
    pipe = shipped_pipeline()
    with pytest.raises(ValueError, match=r"^reference_area must be .*got 100$"):
        run_edit(pipe, make_edit(0, "test", 0), reference_area=100)


def test_the_shipped_pipeline_loads_with_from_pretrained_within_25_mb_per_component():
    for component in ("transformer", "vae", "text_encoder", ZERO_COND_T_SUBFOLDER):
        files = list((SHIPPED_DIR / component).glob("*.safetensors"))
        assert files and sum(f.stat().st_size for f in files) < 25 * 2**20, component
    assert shipped_pipeline().transformer.config.zero_cond_t is False
    assert shipped_pipeline(zero_cond_t=True).transformer.config.zero_cond_t is True


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_the_shipped_pipeline_makes_the_demo_recolour_edit_as_asked(zero_cond_t):
    from evaluation.metrics import psnr

    sample = make_edit(0, "test", DEMO_EDIT_INDEX)
    assert sample.edit_type == "recolour"
    image = run_edit(shipped_pipeline(zero_cond_t=zero_cond_t), sample)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert mask_colour(image, sample.asked_mask()) == sample.new_colour
    assert psnr(image, sample.target_image()) > psnr(sample.source_image(), sample.target_image())


def test_the_training_record_says_how_the_shipped_pipeline_was_made():
    record = json.loads((SHIPPED_DIR / RECORD_FILE).read_text())
    vae, transformer = record["vae"], record["transformer"]
    assert {k: vae["settings"][k] for k in VAE_DEFAULTS} == VAE_DEFAULTS
    assert {k: transformer["settings"][k] for k in TRANSFORMER_DEFAULTS} == TRANSFORMER_DEFAULTS
    last = transformer["evaluations"][-1]
    assert last["step"] == transformer["settings"]["steps"] and transformer["train_seconds"] > 0
    # the model learned to edit: clearly above returning the input unchanged, on held-out validation edits
    assert last["model"]["all"]["psnr"]["mean"] > last["identity"]["all"]["psnr"]["mean"] + 1.0
    assert record["transformer_zero_cond_t"]["settings"]["zero_cond_t"] is True
    assert (SHIPPED_DIR / "README.md").read_text().count("|") > 10


def test_vae_training_resumed_from_a_checkpoint_ends_with_the_uninterrupted_runs_weights(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from models.tiny.edit_testbed import train_vae

    settings = dict(VAE_DEFAULTS, vae_steps=2, vae_batch_size=2, vae_base_dim=4, seed=0, eval_size=2, eval_every=1)

    def keep_step_1_checkpoint(message):  # logged before the step-2 checkpoint replaces the step-1 one
        if message.startswith("step 2"):
            shutil.copy(tmp_path / "whole.pt", tmp_path / "part.pt")

    train_vae(tmp_path / "whole", checkpoint=tmp_path / "whole.pt", log=keep_step_1_checkpoint, **settings)
    resumed = train_vae(tmp_path / "resumed", checkpoint=tmp_path / "part.pt", resume=True, log=lambda *_: None,
                        **settings)
    assert [e["step"] for e in resumed["evaluations"]] == [1, 2]
    whole = load_file(tmp_path / "whole" / "diffusion_pytorch_model.safetensors")
    again = load_file(tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert len(json.loads((tmp_path / "resumed" / RECORD_FILE).read_text())["latents_mean"]) == 16


def test_transformer_training_resumed_from_a_checkpoint_ends_with_the_uninterrupted_runs_weights(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from models.tiny.edit_testbed import train_transformer

    settings = dict(TRANSFORMER_DEFAULTS, steps=2, batch_size=4, num_layers=1, num_heads=2, train_edits=8, warmup=1,
                    seed=0, eval_size=2, eval_every=1)

    def keep_step_1_checkpoint(message):  # logged before the step-2 checkpoint replaces the step-1 one
        if message.startswith("step 2"):
            shutil.copy(tmp_path / "whole.pt", tmp_path / "part.pt")

    common = dict(vae_dir=SHIPPED_DIR / "vae", cache=tmp_path / "encoded.pt")
    whole = train_transformer(tmp_path / "whole", checkpoint=tmp_path / "whole.pt", log=keep_step_1_checkpoint,
                              **common, **settings)
    resumed = train_transformer(tmp_path / "resumed", checkpoint=tmp_path / "part.pt", resume=True,
                                log=lambda *_: None, **common, **settings)
    assert [e["step"] for e in resumed["evaluations"]] == [1, 2]
    assert resumed["evaluations"][0]["model"] == whole["evaluations"][0]["model"]
    a = load_file(tmp_path / "whole" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    encoded = torch.load(tmp_path / "encoded.pt", weights_only=False)
    assert len(encoded["prompt_embeds"]) == 8 and encoded["source"].shape == (8, (IMAGE_SIZE // 16) ** 2, 64)


def test_make_train_edit_base_chains_every_stage_into_a_pipeline_that_loads(tmp_path, capsys):
    from tests.script_loader import run_script_in_process

    out = tmp_path / "pipeline"
    tiny = ["--vae-steps", "2", "--steps", "2", "--zero-cond-t-steps", "2", "--train-edits", "16", "--eval-size", "2",
            "--eval-every", "1", "--batch-size", "4", "--vae-batch-size", "2"]
    proc = run_script_in_process("train_edit_base", ["--stage", "all", "--work-dir", str(tmp_path / "work"),
                                                     "--output-dir", str(out), *tiny], capsys)
    assert proc.returncode == 0, proc.stderr
    for stage in ("vae", "transformer", "transformer_zero_cond_t"):
        assert (tmp_path / "work" / stage / RECORD_FILE).is_file()
    records = json.loads((out / RECORD_FILE).read_text())
    assert set(records) == {"vae", "transformer", "transformer_zero_cond_t"}
    pipe = shipped_pipeline(zero_cond_t=True, path=out)
    assert pipe.transformer.config.zero_cond_t and "assembled pipeline saved" in proc.stdout
