#!/usr/bin/env python
"""Time the three systems at the REAL model shapes on one GPU: random weights, bf16, SDPA attention.

Not a test. The scaled CPU benchmarks (``bench_edit.py``, ``bench_video.py``, ``bench_llava.py``) keep
the real models' proportions; this script builds the real sizes (random weights: speed does not depend
on them) directly on the device in the target dtype (``torch.device`` context + default dtype, no CPU
init) and frees each model before the next one:

* ``edit``: the forked ``QwenImageTransformer2DModel`` at Qwen-Image(-Edit-2509)'s configuration (60
  dual-stream blocks, 24 heads x 128 = 3072, joint_attention_dim 3584, axes_dims_rope 16/56/56, patch
  2, 64 in / 16 out channels; ~20B parameters), a whole 4-step 1024x1024 edit (L_denoise = L_reference
  = 4096 packed latent tokens, 200 text tokens), transformer time per reuse mode (none / mlp / full /
  kv) and refresh schedule (alternate / once), with per-step times; ``--references 1 2`` times one and
  two 1024x1024 reference images (Edit-2509/2511, the Plus pipeline; every reference is reused).
* ``video``: Qwen2.5-VL-7B (28 layers, hidden 3584, 28/4 GQA heads, MLP 18944, vocab 152064; the 32-block
  windowed ViT, width 1280) through ``pipelines.prunevid.Qwen25VLPruneVid`` with the presets baseline /
  stage2_only / default / aggressive on 16 (and, if the time budget allows, 64) synthetic 448x448 frames
  (2048 / 8192 visual tokens; frames drawn in memory, no decord): TTFT split into vision tower /
  stage 1 / LLM prefill / rest, decode tokens/s, KV-cache bytes, peak memory.
* ``llava``: LLaVA-1.5-7B (CLIP ViT-L/14-336, 576 tokens; Vicuna-7B): ``scripts/bench_llava.py --scale 1``
  in a subprocess: prefill time of unpruned / learned (untrained heads) / random / FastV / DivPrune at
  budgets 0.35 and 0.25.

Every configuration runs in one process against its baseline: one warm-up round, then ``--repeats``
interleaved rounds, median; timers are wall clocks around ``torch.cuda.synchronize()``. A per-system
``--budget-s`` (and a ``--total-budget-s``) skips the remaining rounds / configurations with a note, so
the run cannot overrun. Attention is PyTorch SDPA everywhere: flash-attention 2 cannot be installed on
the GPU machine (no network). Numbers go to ``--stats-json`` after each system (partial results survive).

Device command (one line, under 2000 characters; ``carry: [".whl"]``, timeout_s 480):

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false && python3 scripts/gpu_real_shapes.py --device cuda --stats-json $OUT/gpu_real_shapes.json 2>&1 | tee $OUT/gpu_real_shapes.log

Here (CPU, every shape shrunk; ~10 s):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/gpu_real_shapes.py --tiny --device cpu
    .venv/bin/python scripts/gpu_real_shapes.py --plan          # FLOP-based time estimate of the GPU run

The edit transformer alone, with one and two reference images, every mode and schedule (FLOP estimate: 95 s of
compute on an H200; the whole command under 8 minutes):

    ... python3 scripts/gpu_real_shapes.py --device cuda --systems edit --references 1 2 --budget-s 400 --total-budget-s 420 --stats-json $OUT/gpu_edit_plus.json
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from cli import ArgumentParser, UserError, run_cli, write_json

SYSTEMS = ("edit", "video", "llava")
VIDEO_PRESETS = ("baseline", "stage2_only", "default", "aggressive")
EFFECTIVE_TFLOPS = 400.0  # assumed effective bf16 rate for --plan (H200 dense peak ~990, measured GEMM ~790)
DECODE_STEP_S = 0.030  # assumed HF-generate decode step of a 7B on a GPU (launch-bound), for --plan
QUESTION = "What is moving in the video, and in which direction?"

# Real configurations (diffusers' QwenImageTransformer2DModel defaults = Qwen/Qwen-Image transformer/config.json;
# Qwen/Qwen2.5-VL-7B-Instruct config.json; llava-hf/llava-1.5-7b-hf config.json).
EDIT_REAL = dict(heads=24, head_dim=128, axes=(16, 56, 56), blocks=60, grid=(64, 64), joint_dim=3584)
EDIT_TINY = dict(heads=2, head_dim=32, axes=(8, 12, 12), blocks=2, grid=(8, 8), joint_dim=64)
VIDEO_TEXT_REAL = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, max_window_layers=28,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)  # fmt: skip
VIDEO_VISION_REAL = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584,
)  # fmt: skip
FRAME_PX = {False: 448, True: 112}  # 448 px: 16 x 16 merged tokens per 2-frame grid step; tiny: 4 x 4


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of edit,video,llava")
    p.add_argument("--tiny", action="store_true", help="shrink every shape (CPU smoke test of the whole script)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; --tiny 1)")
    p.add_argument("--budget-s", type=float, default=150.0, help="per-system time budget, model init included")
    p.add_argument("--total-budget-s", type=float, default=330.0, help="whole-run budget; later systems are skipped")
    p.add_argument("--stats-json", type=Path, default=Path("outputs_bench/gpu_real_shapes.json"))
    p.add_argument("--plan", action="store_true", help="print the FLOP-based time estimate of the run and exit")
    g = p.add_argument_group("edit")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--text-len", type=int, default=200, help="text tokens (200: Edit-2509/2511; ~1400: original Edit)")
    g.add_argument("--modes", default="mlp,full,kv")
    g.add_argument("--schedules", default="alternate,once")
    g.add_argument("--zero-cond-t", action="store_true", help="Edit-2511's zero_cond_t modulation")
    g.add_argument("--references", type=int, nargs="+", default=[1],
                   help="numbers of 1024x1024 reference images to time (Edit-2509/2511 take several), e.g. 1 2")
    g = p.add_argument_group("video")
    g.add_argument("--frames", default=None, help="frame counts (default 16,64; --tiny 8,16); later ones if time allows")
    g.add_argument("--presets", default=",".join(VIDEO_PRESETS))
    g.add_argument("--max-new-tokens", type=int, default=16)
    g = p.add_argument_group("llava")
    g.add_argument("--budgets", default="0.35,0.25", help="token budgets for bench_llava.py")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        raise UserError(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    args.frames = [int(x) for x in (args.frames or ("8,16" if args.tiny else "16,64")).split(",") if x]
    if any(f < 2 or f % 2 for f in args.frames):
        raise UserError(f"--frames must be even numbers >= 2 (Qwen2.5-VL's temporal patch is 2 frames), got {args.frames}")
    args.presets = [x for x in args.presets.split(",") if x]
    if "baseline" in args.presets:
        args.presets.remove("baseline")
    args.presets.insert(0, "baseline")
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("mlp", "full", "kv") for m in args.modes):
        raise UserError(f"--modes: choose from mlp, full, kv, got {args.modes}")
    args.schedules = [s for s in args.schedules.split(",") if s]
    if any(n < 1 for n in args.references):
        raise UserError(f"--references must be >= 1, got {args.references}")
    if args.repeats < 1 or args.steps < 1 or args.max_new_tokens < 2:
        raise UserError("--repeats and --steps must be >= 1, --max-new-tokens >= 2")
    return args


# ----------------------------------------------------------------------------- shared plumbing


def log(message: str) -> None:
    print(message, flush=True)


class Run:
    """Device, dtype, synchronised clock and the time budgets of one system."""

    def __init__(self, args, torch, budget_s: float):
        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.notes: list[str] = []

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, predicted_s: float, what: str) -> bool:
        """Whether ``what`` (predicted to take ``predicted_s``) still fits the budget; notes a skip."""
        if self.elapsed() + predicted_s <= self.budget_s:
            return True
        note = (f"skipped {what}: {self.elapsed():.0f} s spent + {predicted_s:.0f} s predicted > budget "
                f"{self.budget_s:.0f} s")
        self.notes.append(note)
        log(f"  [budget] {note}")
        return False

    @contextmanager
    def building(self):
        """Create modules directly on the device in the target dtype (no CPU init, no second copy)."""
        torch = self.torch
        old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                yield
        finally:
            torch.set_default_dtype(old)

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        t = self.torch.cuda
        return {"allocated_gib": t.memory_allocated(self.device) / 2**30,
                "peak_allocated_gib": t.max_memory_allocated(self.device) / 2**30}


@contextmanager
def sync_timer(run: Run, module, into: list):
    """Append the synchronised wall time of every forward of ``module`` to ``into`` while active."""
    box = {}

    def before(*_):
        run.sync()
        box["t"] = time.perf_counter()

    def after(*_):
        run.sync()
        into.append(time.perf_counter() - box["t"])

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def random_init_(model, std: float, seed: int = 0) -> None:
    """Re-draw every parameter on its own device: N(0, std); 1-D ``*weight`` (norms): N(1, std)."""
    import torch

    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + i)
            p.normal_(1.0 if p.dim() == 1 and name.endswith("weight") else 0.0, std, generator=g)


def env_info(args) -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "device": args.device, "dtype": args.dtype,
            "attention": "PyTorch SDPA (torch.nn.functional.scaled_dot_product_attention)",
            "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
            "torch_threads": torch.get_num_threads()}
    for name in ("transformers", "diffusers", "huggingface_hub", "tokenizers", "accelerate"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - report, do not fail
            info[name] = f"unavailable ({type(error).__name__})"
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                    gpu_sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                    sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                    sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    sdpa_cudnn=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)())
    else:
        info.update(gpu=None, processor=platform.processor() or platform.machine())
    return info


# ----------------------------------------------------------------------------- A: Qwen-Image-Edit reference reuse


def edit_shape(args) -> dict:
    shape = dict(EDIT_TINY if args.tiny else EDIT_REAL)
    shape["text_len"] = 8 if args.tiny else args.text_len
    return shape


def edit_configs(args) -> list[tuple[str, str | None, int]]:
    """(mode, schedule, number of reference images), the baseline first for each number of references."""
    return [(mode, sch, n) for n in args.references
            for mode, sch in [("none", None)] + [(m, s) for s in args.schedules for m in args.modes]]


def edit_flops(args, mode: str, schedule: str | None, num_references: int) -> float:
    from evaluation.flops import QwenImageShape, qwenimage_call_flops
    from pruning.edit.reference_reuse import resolve_refresh_steps

    s = edit_shape(args)
    length = s["grid"][0] * s["grid"][1]
    shape = QwenImageShape(num_blocks=s["blocks"], dim=s["heads"] * s["head_dim"], denoise_len=length,
                           reference_len=num_references * length, text_len=s["text_len"])
    refresh = resolve_refresh_steps(schedule, args.steps) if schedule else ()
    return sum(qwenimage_call_flops(shape, mode, mode != "none" and step not in refresh)
               for step in range(1, args.steps + 1))


def run_edit(args, run: Run) -> dict:
    torch = run.torch
    from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel
    from pruning.edit.reference_reuse import reference_reuse, resolve_refresh_steps

    s = edit_shape(args)
    h, w = s["grid"]
    length, text_len = h * w, s["text_len"]
    for sch in args.schedules:
        try:
            resolve_refresh_steps(sch, args.steps)
        except ValueError as error:
            raise UserError(f"--schedules: {error}") from None
    config = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=s["blocks"], attention_head_dim=s["head_dim"],
                  num_attention_heads=s["heads"], joint_attention_dim=s["joint_dim"], axes_dims_rope=s["axes"],
                  zero_cond_t=args.zero_cond_t)
    log(f"[edit] building QwenImageTransformer2DModel {config} on {run.device} ({args.dtype})")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with run.building():
        model = QwenImageTransformer2DModel(**config)
    model.eval().requires_grad_(False)
    run.sync()
    init_s = time.perf_counter() - t0
    n_params = count_params(model)
    log(f"[edit] {n_params / 1e9:.2f} B parameters built in {init_s:.1f} s")

    g = torch.Generator(device=run.device).manual_seed(0)
    dev, dt = run.device, run.dtype
    references = torch.randn(1, max(args.references) * length, 64, generator=g, device=dev, dtype=dt)
    noises = [torch.randn(1, length, 64, generator=g, device=dev, dtype=dt) for _ in range(args.steps)]
    text = torch.randn(1, text_len, s["joint_dim"], generator=g, device=dev, dtype=dt)
    # The Edit(-Plus) pipeline drops an all-ones prompt mask (``if prompt_embeds_mask.all(): ... = None``), so at
    # batch 1 the transformer gets no mask and SDPA may pick its flash kernel (bench_edit.py passes none either).
    mask = None

    @torch.no_grad()
    def edit(mode: str, schedule: str | None, num_references: int) -> dict:
        steps = []
        reference = references[:, : num_references * length]
        img_shapes = [[(1, h, w)] * (1 + num_references)]
        with contextlib.ExitStack() as stack:
            reuse = None if mode == "none" else stack.enter_context(reference_reuse(model, mode, args.steps, schedule))
            for step in range(args.steps):
                kwargs = dict(
                    hidden_states=torch.cat([noises[step], reference], dim=1), encoder_hidden_states=text,
                    encoder_hidden_states_mask=mask,
                    timestep=torch.full((1,), 1.0 - step / args.steps, device=dev, dtype=dt),
                    img_shapes=img_shapes, return_dict=False,
                )
                start = run.now()
                with model.cache_context("cond"):
                    model(**kwargs)
                steps.append(run.now() - start)
            cache = reuse.peak_cache_bytes if reuse is not None else 0
        return {"steps": steps, "total": sum(steps), "cache_bytes": cache}

    configs = edit_configs(args)
    times: dict = {c: [] for c in configs}
    last: dict = {}
    rounds_done = 0
    for rnd in range(args.repeats + 1):  # round 0: warm-up
        label = "warm-up" if rnd == 0 else f"round {rnd}/{args.repeats}"
        stop = False
        for c in configs:
            predicted = last.get(c, max(last.values(), default=0.0))
            if not run.allows(predicted, f"edit {label} from {c[0]}/{c[1] or '-'}/{c[2]} reference(s) on"):
                stop = True
                break
            start = time.perf_counter()
            result = edit(*c)
            last[c] = time.perf_counter() - start
            if rnd > 0:
                times[c].append(result)
            log(f"  [edit] {label} refs {c[2]} {c[0]:<4} {c[1] or '-':<9} {result['total']:.3f} s "
                f"(steps {', '.join(f'{x:.3f}' for x in result['steps'])})")
        if stop:
            break
        rounds_done = rnd

    rows = []
    for mode, sch, n in configs:
        results = times[(mode, sch, n)]
        if not results:
            rows.append({"references": n, "mode": mode, "schedule": sch or "-", "skipped": True})
            continue
        base = median([r["total"] for r in times[("none", None, n)]])
        total = median([r["total"] for r in results])
        flops = edit_flops(args, mode, sch, n)
        refresh = resolve_refresh_steps(sch, args.steps) if sch else tuple(range(1, args.steps + 1))
        rows.append({
            "references": n, "mode": mode, "schedule": sch or "-", "refresh_steps": list(refresh), "median_s": total,
            "step_median_s": [median([r["steps"][i] for r in results]) for i in range(args.steps)],
            "speedup": (base / total) if base else None,
            "flops_bound_speedup": edit_flops(args, "none", None, n) / flops, "flops": flops,
            "achieved_tflops": flops / total / 1e12, "cache_bytes": results[0]["cache_bytes"],
            "times_s": [r["total"] for r in results],
        })
    log(f"\n[edit] Qwen-Image transformer, D={s['heads'] * s['head_dim']} ({s['heads']}x{s['head_dim']}), "
        f"{s['blocks']} blocks, L_denoise=L_image={length} per image, text={text_len}, {args.steps} steps, "
        f"{args.dtype}, {n_params / 1e9:.2f} B params; median of {rounds_done} round(s)")
    log(f"{'refs':>4} {'mode':<5} {'schedule':<10} {'refresh':<8} {'edit s':>8} {'speedup':>8} {'bound':>7} "
        f"{'TFLOP/s':>8} {'cache GiB':>9}  per-step s")
    for r in rows:
        if r.get("skipped"):
            log(f"{r['references']:>4} {r['mode']:<5} {r['schedule']:<10} skipped (budget)")
            continue
        log(f"{r['references']:>4} {r['mode']:<5} {r['schedule']:<10} {','.join(map(str, r['refresh_steps'])):<8} "
            f"{r['median_s']:>8.3f} "
            f"{(r['speedup'] or 0):>7.2f}x {r['flops_bound_speedup']:>6.2f}x {r['achieved_tflops']:>8.1f} "
            f"{r['cache_bytes'] / 2**30:>9.2f}  {' '.join(f'{x:.3f}' for x in r['step_median_s'])}")
    return {"config": {**config, "axes_dims_rope": list(s["axes"]), "denoise_len": length,
                       "references": list(args.references), "reference_len_per_image": length,
                       "text_len": text_len, "steps": args.steps, "params": n_params,
                       "param_dtype": str(next(model.parameters()).dtype), "text_mask": None},
            "init_s": init_s, "rounds": rounds_done, "rows": rows}


# ----------------------------------------------------------------------------- B: PruneVid on Qwen2.5-VL


def video_tokens(args, frames: int) -> int:
    per_side = FRAME_PX[args.tiny] // 28
    return frames // 2 * per_side * per_side


def build_video_model(args, run: Run):
    from transformers import Qwen2_5_VLConfig

    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from models.tiny.qwen2_5_vl import build_qwen2_5_vl_processor, tiny_text_config_kwargs, tiny_vision_config_kwargs
    from models.tiny.qwen_tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_PAD, VISION_START, build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()  # the embedded tokenizer: its ids all lie inside the real 152064 vocab
    text = tiny_text_config_kwargs(tokenizer)
    vision = tiny_vision_config_kwargs(text["hidden_size"])
    if not args.tiny:
        text.update(VIDEO_TEXT_REAL)
        vision.update(VIDEO_VISION_REAL)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids(IMAGE_PAD),
                              video_token_id=ids(VIDEO_PAD), vision_start_token_id=ids(VISION_START),
                              vision_end_token_id=ids(VISION_END), vision_token_id=ids(VISION_PAD),
                              tie_word_embeddings=False)
    with run.building():
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=run.dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    random_init_(model, std=0.05)  # as bench_video.py's seeded_init_(std=0.05), drawn on the device
    gen = model.generation_config
    gen.eos_token_id = None  # random weights: never stop early, every preset decodes max_new_tokens tokens
    gen.pad_token_id = text["pad_token_id"]
    processor = build_qwen2_5_vl_processor(tokenizer)
    px = FRAME_PX[args.tiny]
    processor.video_processor.max_pixels = px * px
    processor.video_processor.size = {"shortest_edge": 56 * 56, "longest_edge": px * px}
    return model, processor


def synthetic_video(frames: int, px: int):
    """The demo scene (static background, two moving objects) drawn in memory: a LoadedVideo without decord."""
    from transformers.video_utils import VideoMetadata

    from data.demo_video import DEFAULT_FPS, make_demo_frames
    from pipelines.video_io import LoadedVideo

    array = make_demo_frames(frames, size=(px, px))
    indices = list(range(frames))
    meta = VideoMetadata(total_num_frames=frames, fps=DEFAULT_FPS, width=px, height=px,
                         duration=frames / DEFAULT_FPS, frames_indices=indices)
    return LoadedVideo(frames=array, indices=indices, total_frames=frames, fps=DEFAULT_FPS, metadata=meta)


def vision_flops(args, frames: int) -> float:
    """Qwen2.5-VL ViT FLOPs (projections, SwiGLU MLP, windowed / per-frame attention, patch merger)."""
    v = dict(depth=4, hidden_size=64, intermediate_size=172, window_size=56, full=2) if args.tiny else \
        dict(VIDEO_VISION_REAL, full=4)
    patches = video_tokens(args, frames) * 4
    d, m = v["hidden_size"], v["intermediate_size"]
    per_frame = (FRAME_PX[args.tiny] // 14) ** 2
    window = (v["window_size"] // 14) ** 2
    dense = 2 * patches * (4 * d * d + 3 * d * m)
    attn = lambda span: 4 * patches * span * d  # noqa: E731
    out = VIDEO_TEXT_REAL["hidden_size"] if not args.tiny else 64
    merger = 2 * (patches // 4) * (4 * d * 4 * d + 4 * d * out)
    return v["depth"] * dense + (v["depth"] - v["full"]) * attn(window) + v["full"] * attn(per_frame) + merger


def run_video(args, run: Run) -> dict:
    from pipelines.prunevid import Qwen25VLPruneVid
    from evaluation.flops import Qwen2_5_VLTextShape, qwen2_5_vl_prefill_flops
    from pruning.video.runtime import PruneVidState

    log(f"[video] building Qwen2.5-VL-{'tiny' if args.tiny else '7B'} on {run.device} ({args.dtype})")
    t0 = time.perf_counter()
    model, processor = build_video_model(args, run)
    run.sync()
    init_s = time.perf_counter() - t0
    n_params = count_params(model)
    tc = model.config.get_text_config()
    log(f"[video] {n_params / 1e9:.2f} B parameters built in {init_s:.1f} s "
        f"(attention: {model.config._attn_implementation})")
    base = Qwen25VLPruneVid(preset="baseline", num_frames=args.frames[0], _model=model, _processor=processor)
    pipes = {name: base if name == "baseline" else base.with_config(name) for name in args.presets}

    marks = {"vision": [], "llm": [], "stage1": []}
    original_begin = PruneVidState.begin_prefill

    def timed_begin(self, *a, **k):
        start = run.now()
        try:
            return original_begin(self, *a, **k)
        finally:
            marks["stage1"].append(run.now() - start)

    rows, by_frames, spent_per_frames = [], {}, {}
    PruneVidState.begin_prefill = timed_begin
    try:
        with sync_timer(run, model.model.visual, marks["vision"]), \
                sync_timer(run, model.model.language_model, marks["llm"]):
            for fi, frames in enumerate(args.frames):
                if fi > 0:
                    prev = args.frames[fi - 1]
                    predicted = spent_per_frames[prev] * frames / prev * 1.2
                    if not run.allows(predicted, f"video at {frames} frames"):
                        break
                t_frames = time.perf_counter()
                video = synthetic_video(frames, FRAME_PX[args.tiny])
                for pipe in pipes.values():
                    pipe.num_frames = frames
                inputs = base.prepare_inputs(video, QUESTION)
                log(f"[video] {frames} frames of {FRAME_PX[args.tiny]} px: prompt {inputs['input_ids'].shape[1]} tokens, "
                    f"video_grid_thw {inputs['video_grid_thw'].tolist()}")

                def one(name: str) -> dict:
                    for key in marks:
                        marks[key].clear()
                    result = pipes[name].generate_from_inputs(inputs, max_new_tokens=args.max_new_tokens)
                    result["vision_s"] = sum(marks["vision"])
                    result["stage1_s"] = sum(marks["stage1"])
                    result["llm_prefill_s"] = marks["llm"][0] if marks["llm"] else None
                    result["llm_decode_step_s"] = median(marks["llm"][1:])
                    known = result["vision_s"] + result["stage1_s"] + (result["llm_prefill_s"] or 0.0)
                    result["other_s"] = result["ttft_s"] - known
                    return result

                results = {name: [] for name in args.presets}
                last: dict = {}
                for rnd in range(args.repeats + 1):
                    label = "warm-up" if rnd == 0 else f"round {rnd}/{args.repeats}"
                    stop = False
                    for name in args.presets:
                        if not run.allows(last.get(name, max(last.values(), default=0.0)),
                                          f"video {frames} frames {label} from {name} on"):
                            stop = True
                            break
                        start = time.perf_counter()
                        r = one(name)
                        last[name] = time.perf_counter() - start
                        if rnd > 0:
                            results[name].append(r)
                        log(f"  [video] {frames}f {label} {name:<12} TTFT {r['ttft_s']:.3f} s (vision {r['vision_s']:.3f}, "
                            f"stage1 {r['stage1_s']:.3f}, LLM {r['llm_prefill_s'] or 0:.3f}), "
                            f"{r['decode_tokens_per_s'] or 0:.1f} tok/s, visual {r['tokens_before_stage1']}->"
                            f"{r['tokens_after_stage1']}->{r['tokens_after']}")
                    if stop:
                        break
                spent_per_frames[frames] = time.perf_counter() - t_frames
                by_frames[frames] = results
                rows += video_rows(args, frames, results, tc, Qwen2_5_VLTextShape, qwen2_5_vl_prefill_flops)
    finally:
        PruneVidState.begin_prefill = original_begin

    log(f"\n[video] Qwen2.5-VL-{'tiny' if args.tiny else '7B'} ({n_params / 1e9:.2f} B params), "
        f"{args.dtype}, max_new_tokens {args.max_new_tokens}, medians")
    log(f"{'frames':>6} {'preset':<12} {'visual tokens':<18} {'TTFT s':>7} {'vision':>7} {'stage1':>7} {'LLM':>7} "
        f"{'other':>6} {'TTFT x':>7} {'LLM x':>6} {'bound':>6} {'tok/s':>7} {'KV MiB':>8} {'peak GiB':>8} {'TFLOP/s':>7}")
    for r in rows:
        if r.get("skipped"):
            log(f"{r['frames']:>6} {r['preset']:<12} skipped (budget)")
            continue
        v = "->".join(map(str, r["visual_tokens"]))
        log(f"{r['frames']:>6} {r['preset']:<12} {v:<18} {r['ttft_s']:>7.3f} {r['vision_s']:>7.3f} {r['stage1_s']:>7.3f} "
            f"{r['llm_prefill_s']:>7.3f} {r['other_s']:>6.3f} {r['ttft_speedup']:>6.2f}x {r['llm_prefill_speedup']:>5.2f}x "
            f"{r['llm_flops_bound_speedup']:>5.2f}x {(r['decode_tokens_per_s'] or 0):>7.1f} "
            f"{(r['kv_cache_bytes'] or 0) / 2**20:>8.1f} {(r['peak_memory_bytes'] or 0) / 2**30:>8.2f} "
            f"{r['llm_achieved_tflops']:>7.1f}")
    return {"config": {"text": {k: getattr(tc, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                              "num_hidden_layers", "num_attention_heads",
                                                              "num_key_value_heads")},
                       "vision": {k: getattr(model.config.vision_config, k) for k in (
                           "depth", "hidden_size", "intermediate_size", "num_heads", "window_size",
                           "fullatt_block_indexes", "out_hidden_size")},
                       "frame_px": FRAME_PX[args.tiny], "frames": args.frames, "presets": args.presets,
                       "max_new_tokens": args.max_new_tokens, "params": n_params,
                       "param_dtype": str(next(model.parameters()).dtype),
                       "attn_implementation": model.config._attn_implementation},
            "init_s": init_s, "rows": rows}


def video_rows(args, frames, results, tc, Shape, prefill_flops) -> list[dict]:
    rows = []
    for name, rs in results.items():
        if not rs:
            rows.append({"frames": frames, "preset": name, "skipped": True})
            continue
        r0 = rs[0]
        text_tokens = r0["prompt_tokens"] - r0["tokens_before_stage1"]
        v0, v1, v2 = r0["tokens_before_stage1"], r0["tokens_after_stage1"], r0["tokens_after"]
        layer = r0["pruning_layer"] if r0["pruning_layer"] is not None else tc.num_hidden_layers - 1
        shape = Shape(num_layers=tc.num_hidden_layers, hidden=tc.hidden_size, num_heads=tc.num_attention_heads,
                      num_kv_heads=tc.num_key_value_heads, intermediate=tc.intermediate_size, pruning_layer=layer,
                      text_tokens=text_tokens, visual_tokens=v0)
        flops = prefill_flops(shape, v1, v2)
        row = {"frames": frames, "preset": name, "visual_tokens": [v0, v1, v2], "prompt_tokens": r0["prompt_tokens"],
               "text_tokens": text_tokens, "pruning_layer": r0["pruning_layer"]}
        for key in ("ttft_s", "vision_s", "stage1_s", "llm_prefill_s", "other_s", "decode_tokens_per_s",
                    "llm_decode_step_s", "generate_s"):
            row[key] = median([r[key] for r in rs])
        row.update(kv_cache_bytes=r0["kv_cache_bytes"], kv_cache_length_per_layer=r0["kv_cache_length_per_layer"],
                   peak_memory_bytes=max(r["peak_memory_bytes"] for r in rs), peak_memory_kind=r0["peak_memory_kind"],
                   new_tokens=r0["new_tokens"], llm_flops=flops, llm_achieved_tflops=flops / row["llm_prefill_s"] / 1e12,
                   vision_flops=vision_flops(args, frames), ttft_all_s=[r["ttft_s"] for r in rs])
        rows.append(row)
    b = next((r for r in rows if r["preset"] == "baseline" and not r.get("skipped")), None)
    for r in rows:
        if r.get("skipped") or b is None:
            continue
        r["ttft_speedup"] = b["ttft_s"] / r["ttft_s"]
        r["llm_prefill_speedup"] = b["llm_prefill_s"] / r["llm_prefill_s"]
        r["llm_flops_bound_speedup"] = b["llm_flops"] / r["llm_flops"]
        r["decode_speedup"] = (r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                               if r["decode_tokens_per_s"] and b["decode_tokens_per_s"] else None)
        r["kv_cache_ratio"] = (r["kv_cache_bytes"] / b["kv_cache_bytes"]) if b["kv_cache_bytes"] else None
    return rows


# ----------------------------------------------------------------------------- C: LLaVA-1.5 via bench_llava.py


def run_llava(args, run: Run) -> dict:
    """``scripts/bench_llava.py --scale 1`` (the real 7B shapes; ``--tiny``: scale 4) on the device, in a subprocess."""
    import json
    import subprocess

    out = Path(args.stats_json).with_name(Path(args.stats_json).stem + ".bench_llava.json")
    command = [sys.executable, str(Path(__file__).resolve().parent / "bench_llava.py"),
               "--scale", "4" if args.tiny else "1", "--device", args.device,
               "--dtype", "bfloat16" if args.dtype == "bf16" else "float32",
               "--budgets", args.budgets, "--repeats", str(args.repeats), "--stats-json", str(out)]
    log("[llava] " + " ".join(command[1:]))
    proc = subprocess.run(command, text=True, capture_output=True, timeout=max(30.0, run.budget_s * 2))
    log(proc.stdout.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"bench_llava.py exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    report = json.loads(out.read_text())
    return {"bench_llava": report, "command": " ".join(command[1:])}


# ----------------------------------------------------------------------------- plan (FLOP estimate)


def plan(args) -> dict:
    """Expected seconds per system at ``EFFECTIVE_TFLOPS`` (compute only; model init and Python not counted)."""
    from evaluation.flops import LlavaShape, Qwen2_5_VLTextShape, prefill_flops, qwen2_5_vl_prefill_flops

    rate = EFFECTIVE_TFLOPS * 1e12
    rounds = args.repeats + 1
    out = {}
    edit_s = sum(edit_flops(args, *config) for config in edit_configs(args)) / rate
    out["edit"] = {"per_round_s": edit_s, "total_s": edit_s * rounds,
                   "baseline_edit_flops": {n: edit_flops(args, "none", None, n) for n in args.references}}
    video = {}
    for frames in args.frames:
        v = video_tokens(args, frames)
        shape = Qwen2_5_VLTextShape(visual_tokens=v)
        prefill = qwen2_5_vl_prefill_flops(shape, v, v) / rate
        vis = vision_flops(args, frames) / rate
        gen = prefill + vis + (args.max_new_tokens - 1) * DECODE_STEP_S
        video[frames] = {"llm_prefill_s": prefill, "vision_s": vis, "generate_upper_s": gen,
                         "total_s": gen * len(args.presets) * rounds}
    out["video"] = {"per_frames": video, "total_s": sum(x["total_s"] for x in video.values())}
    real = LlavaShape()
    runs = 2 + 4 * len([b for b in args.budgets.split(",") if b])
    llava_s = prefill_flops(real, [real.num_vision] * 32)["total"] / rate
    out["llava"] = {"unpruned_prefill_s": llava_s, "runs": runs, "total_upper_s": llava_s * runs * rounds}
    return out


# ----------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU here: pass --device cpu (with --tiny)")
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if not args.tiny and not args.device.startswith("cuda") and not args.plan:
        raise UserError("the real shapes need a GPU (Qwen-Image alone is 40 GB in bf16): pass --tiny on a CPU")

    estimate = plan(args)
    if args.plan or not args.tiny:
        log(f"FLOP-based estimate at {EFFECTIVE_TFLOPS:.0f} TFLOP/s effective (compute only, "
            f"{args.repeats} rounds + warm-up; model init not counted):")
        log(f"  edit : {estimate['edit']['total_s']:.1f} s ({estimate['edit']['per_round_s']:.2f} s per round of "
            f"{len(edit_configs(args))} edits)")
        for frames, v in estimate["video"]["per_frames"].items():
            log(f"  video: {frames} frames: LLM prefill {v['llm_prefill_s'] * 1e3:.0f} ms, vision {v['vision_s'] * 1e3:.0f} ms, "
                f"generate <= {v['generate_upper_s']:.2f} s (decode {DECODE_STEP_S * 1e3:.0f} ms/step assumed); "
                f"{v['total_s']:.1f} s for {len(args.presets)} presets")
        log(f"  llava: unpruned prefill {estimate['llava']['unpruned_prefill_s'] * 1e3:.0f} ms; <= "
            f"{estimate['llava']['total_upper_s']:.1f} s for {estimate['llava']['runs']} runs")
    if args.plan:
        return 0

    info = env_info(args)
    log(f"device {info.get('gpu') or info.get('processor')} | torch {info['torch']} (CUDA {info['cuda_runtime']}) | "
        f"transformers {info['transformers']} | diffusers {info['diffusers']} | huggingface_hub {info['huggingface_hub']}"
        f" | {args.dtype} | attention: SDPA only (flash-attn {'installed' if info['flash_attn_installed'] else 'not installed: the GPU machine has no network'})")
    stats = {"command": "python scripts/gpu_real_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "env": info, "tiny": args.tiny, "repeats": args.repeats,
             "budget_s": args.budget_s, "total_budget_s": args.total_budget_s,
             "estimate": estimate, "systems": {}}
    functions = {"edit": run_edit, "video": run_video, "llava": run_llava}
    t_start = time.perf_counter()
    failed = False
    for name in args.systems:
        left = args.total_budget_s - (time.perf_counter() - t_start)
        if left < 20:
            stats["systems"][name] = {"status": "skipped", "note": f"total budget: {left:.0f} s left"}
            log(f"[{name}] skipped: total budget {args.total_budget_s:.0f} s nearly spent")
            continue
        run = Run(args, torch, min(args.budget_s, left))
        if run.cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        log(f"\n===== {name} (budget {run.budget_s:.1f} s) =====")
        try:
            result = functions[name](args, run)
            result["status"] = "partial" if run.notes else "ok"
        except Exception as error:  # noqa: BLE001 - one system failing must not lose the others' numbers
            failed = True
            result = {"status": "error", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
            log(f"[{name}] FAILED: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        result.update(seconds=run.elapsed(), notes=run.notes, memory=run.memory())
        stats["systems"][name] = result
        gc.collect()
        if run.cuda:
            torch.cuda.empty_cache()
        write_json(args.stats_json, stats)
        log(f"[{name}] {result['status']} in {run.elapsed():.1f} s; stats in {args.stats_json}")
    stats["total_s"] = time.perf_counter() - t_start
    write_json(args.stats_json, stats)
    log(f"\ntotal {stats['total_s']:.1f} s; stats in {args.stats_json}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
