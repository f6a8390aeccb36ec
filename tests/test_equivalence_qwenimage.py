"""The Qwen-Image transformer fork with pruning disabled is bit-identical to upstream diffusers.

Fork and upstream ``QwenImageTransformer2DModel`` are loaded with ``from_pretrained`` from the
transformer folder of the embedded tiny Qwen-Image-Edit pipeline and compared with ``torch.equal``:

* on a direct forward pass over edit-shaped inputs (denoise tokens + reference-image tokens along
  the sequence, ``img_shapes`` naming both, padded text), with ``zero_cond_t`` off (Qwen-Image-Edit)
  and on (Qwen-Image-Edit-2511: the reference tokens are modulated with timestep 0);
* inside the whole stock ``QwenImageEditPipeline``: every step's latents and the decoded image.

Also checks that the tiny pipeline loads offline, is deterministic, and that the pipelines'
hard-coded prompt-template drop cuts exactly the system prefix with the tiny tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline
from diffusers import QwenImageTransformer2DModel as UpstreamTransformer
from PIL import Image

from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel as ForkTransformer
from data.media import make_sample_image
from models.tiny.qwenimage_edit import build_tiny_qwenimage_edit, tiny_qwenimage_edit_dir

PROMPT = "Change the color of the circle to red."
OUTPUT_SIZE = 128  # 8x8 = 64 denoise tokens; the reference image is encoded at ~1024x1024 px (upstream)
NUM_STEPS = 2
SEED = 0
DENOISE_SHAPE = (1, 4, 4)  # (frames, latent patch rows, cols) of the direct forward test
REFERENCE_SHAPE = (1, 6, 8)


def edit_transformer_inputs(config: dict, batch_size: int, padded_text: bool) -> dict:
    """Random transformer inputs shaped like the edit pipeline's: [B, L1 + L2, C] with ``img_shapes`` for both parts."""
    generator = torch.Generator().manual_seed(SEED)
    seq_len = sum(frames * rows * cols for frames, rows, cols in (DENOISE_SHAPE, REFERENCE_SHAPE))
    text_len = 12
    mask = torch.ones(batch_size, text_len, dtype=torch.long)
    if padded_text:
        mask[-1, text_len - 5 :] = 0  # the last prompt is 5 tokens shorter, zero-padded
    return dict(
        hidden_states=torch.randn(batch_size, seq_len, config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(batch_size, text_len, config["joint_attention_dim"], generator=generator),
        encoder_hidden_states_mask=mask if padded_text else None,
        timestep=torch.rand(batch_size, generator=generator),
        img_shapes=[[DENOISE_SHAPE, REFERENCE_SHAPE]] * batch_size,
        return_dict=False,
    )


class LatentRecorder:
    """``callback_on_step_end`` that keeps a copy of the latents after every denoising step."""

    def __init__(self) -> None:
        self.latents: list[torch.Tensor] = []

    def __call__(self, pipe: QwenImageEditPipeline, step: int, timestep: torch.Tensor, kwargs: dict) -> dict:
        self.latents.append(kwargs["latents"].clone())
        return {}


def run_edit(pipe: QwenImageEditPipeline, image: Image.Image) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One seeded edit at the test size: the decoded image [1, 3, H, W] in [0, 1] and each step's latents."""
    recorder = LatentRecorder()
    output = pipe(
        image=image,
        prompt=PROMPT,
        height=OUTPUT_SIZE,
        width=OUTPUT_SIZE,
        num_inference_steps=NUM_STEPS,
        true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
        callback_on_step_end=recorder,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    return output.images, recorder.latents


@pytest.fixture(scope="module")
def pipeline_dir() -> Path:
    return tiny_qwenimage_edit_dir()


@pytest.fixture(scope="module", params=[False, True], ids=["zero_cond_t=False", "zero_cond_t=True"])
def transformer_pair(request: pytest.FixtureRequest, pipeline_dir: Path) -> tuple[UpstreamTransformer, ForkTransformer]:
    """Upstream and fork transformer from the same saved config and weights, ``zero_cond_t`` overridden."""
    kwargs = dict(subfolder="transformer", zero_cond_t=request.param)
    upstream = UpstreamTransformer.from_pretrained(pipeline_dir, **kwargs).eval()
    fork = ForkTransformer.from_pretrained(pipeline_dir, **kwargs).eval()
    return upstream, fork


@pytest.fixture(scope="module")
def pipe(pipeline_dir: Path) -> QwenImageEditPipeline:
    pipe = QwenImageEditPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def edit_image() -> Image.Image:
    return make_sample_image((256, 192), seed=3)


def test_fork_is_a_distinct_class_from_upstream() -> None:
    assert ForkTransformer is not UpstreamTransformer
    assert ForkTransformer.__module__ == "models.qwenimage.transformer_qwenimage"


def test_tiny_pipeline_loads_offline_with_the_stock_component_classes(pipe: QwenImageEditPipeline) -> None:
    expected = {
        "transformer": "QwenImageTransformer2DModel",
        "vae": "AutoencoderKLQwenImage",
        "text_encoder": "Qwen2_5_VLForConditionalGeneration",
        "tokenizer": "Qwen2Tokenizer",
        "processor": "Qwen2VLProcessor",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    assert {name: type(getattr(pipe, name)).__name__ for name in expected} == expected
    assert pipe.vae_scale_factor == 8 and pipe.latent_channels == 16
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.z_dim
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.time_shift_type == "exponential"


def test_fork_and_upstream_transformer_state_dicts_are_identical(
    transformer_pair: tuple[UpstreamTransformer, ForkTransformer],
) -> None:
    upstream, fork = transformer_pair
    upstream_state, fork_state = upstream.state_dict(), fork.state_dict()
    assert upstream_state.keys() == fork_state.keys()
    assert all(torch.equal(upstream_state[name], fork_state[name]) for name in upstream_state)


@pytest.mark.parametrize("padded_text", [False, True], ids=["batch1-no-mask", "batch2-padded-mask"])
@torch.no_grad()
def test_fork_transformer_forward_is_bit_identical(
    transformer_pair: tuple[UpstreamTransformer, ForkTransformer], padded_text: bool
) -> None:
    upstream, fork = transformer_pair
    inputs = edit_transformer_inputs(dict(upstream.config), batch_size=2 if padded_text else 1, padded_text=padded_text)
    expected = upstream(**inputs)[0]
    actual = fork(**inputs)[0]
    assert expected.shape == inputs["hidden_states"].shape[:2] + (4 * upstream.config.out_channels,)
    assert torch.isfinite(expected).all()
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_zero_cond_t_modulates_reference_tokens_differently(pipeline_dir: Path) -> None:
    """The flag really changes the computation (so the zero_cond_t=True equivalence is not vacuous)."""
    plain = UpstreamTransformer.from_pretrained(pipeline_dir, subfolder="transformer").eval()
    zero_cond = UpstreamTransformer.from_pretrained(pipeline_dir, subfolder="transformer", zero_cond_t=True).eval()
    inputs = edit_transformer_inputs(dict(plain.config), batch_size=1, padded_text=False)
    assert not torch.equal(plain(**inputs)[0], zero_cond(**inputs)[0])


@torch.no_grad()
def test_stock_edit_pipeline_with_fork_transformer_gives_identical_latents_and_image(
    pipeline_dir: Path, pipe: QwenImageEditPipeline, edit_image: Image.Image
) -> None:
    expected_image, expected_latents = run_edit(pipe, edit_image)

    fork_pipe = QwenImageEditPipeline.from_pretrained(pipeline_dir)
    fork_pipe.set_progress_bar_config(disable=True)
    fork_pipe.transformer = ForkTransformer.from_pretrained(pipeline_dir, subfolder="transformer")
    assert type(fork_pipe.transformer) is ForkTransformer
    actual_image, actual_latents = run_edit(fork_pipe, edit_image)

    assert len(expected_latents) == len(actual_latents) == NUM_STEPS
    for step, (got, want) in enumerate(zip(actual_latents, expected_latents)):
        assert torch.equal(got, want), f"latents after step {step} differ"
    assert expected_image.shape == (1, 3, OUTPUT_SIZE, OUTPUT_SIZE)
    assert torch.isfinite(expected_image).all() and expected_image.std() > 0.05  # not a flat image
    assert torch.equal(actual_image, expected_image)


@pytest.mark.parametrize("pipeline_class", [QwenImageEditPipeline, QwenImagePipeline], ids=["edit", "text-to-image"])
def test_pipeline_prompt_template_drop_cuts_exactly_the_system_prefix(
    pipe: QwenImageEditPipeline, pipeline_class: type
) -> None:
    """The pipelines drop a hard-coded number of leading hidden states (64 / 34, counted with the real Qwen
    tokenizer); the tiny tokenizer splits those system prefixes into as many tokens, so the kept embeddings
    start right after ``<|im_start|>user\\n`` as with real weights."""
    components = {name: getattr(pipe, name) for name in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")}
    if pipeline_class is QwenImageEditPipeline:
        components["processor"] = pipe.processor
    target = pipeline_class(**components)
    template = target.prompt_template_encode
    user_turn = "<|im_start|>user\n"
    system_prefix = template[: template.index(user_turn) + len(user_turn)]
    ids = pipe.tokenizer(template.format(PROMPT)).input_ids
    assert pipe.tokenizer.decode(ids[: target.prompt_template_encode_start_idx]) == system_prefix


def test_building_the_tiny_pipeline_twice_gives_identical_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for directory in (first, second):
        directory.mkdir()
        build_tiny_qwenimage_edit(directory)
    first_files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    second_files = sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    assert first_files == second_files
    assert any(path.suffix == ".safetensors" for path in first_files)
    for path in first_files:
        assert (first / path).read_bytes() == (second / path).read_bytes(), str(path)
