"""The demo video of PruneVid (``make run-video``): a static scene with moving objects, written as an AVI file.

Stage 1 of PruneVid separates static tokens (averaged over time) from dynamic ones (kept per frame),
so the demo needs both: a textured background that never changes (a colour gradient and fixed
shapes) and two objects that move. The geometry is laid out on the grid of the model's merged visual
tokens, ``cell = patch_size * spatial_merge_size = 28`` px: every object is one cell large and sits in
exactly one cell for both frames of a Qwen temporal grid step (``temporal_patch_size = 2`` frames),
then jumps to the next cell. So, per grid step, exactly the object cells differ from the background,
which makes "the moving object's tokens stay per frame, the background merges" checkable token by token
(:func:`object_cells`).

The file is an uncompressed AVI (RIFF, one ``vids`` stream of 24-bit ``BI_RGB`` frames, with an
``idx1`` index), written by :func:`write_avi` with the standard library only: lossless, byte-for-byte
deterministic, no video encoder to install, and decodable by decord (FFmpeg's AVI demuxer and rawvideo
decoder). :func:`demo_video_path` caches it under ``$PRUNING_MODELS_CACHE`` (default
``.cache/tiny_models``) next to the embedded models.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.media import PALETTE, draw_shape
from models.tiny import cache_root

VERSION = 2  # 2: the one palette and shape renderer of data.media
"""Bump whenever anything below changes the written file."""

CELL = 28  # px: one merged visual token of Qwen2.5-VL (14 px patches, 2x2 merge)
FRAMES_PER_STEP = 2  # Qwen2.5-VL temporal_patch_size
DEFAULT_NUM_FRAMES = 16
DEFAULT_SIZE = (112, 112)  # (W, H): 4x4 cells, the tiny model's video frame size
DEFAULT_FPS = 4.0


def _check(num_frames: int, size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if width % CELL or height % CELL or width < 2 * CELL or height < 2 * CELL:
        raise ValueError(f"size must be multiples of {CELL} px and at least {2 * CELL} px per side, got {size}")
    return width // CELL, height // CELL


def object_cells(num_frames: int = DEFAULT_NUM_FRAMES, size: tuple[int, int] = DEFAULT_SIZE) -> list[list[tuple[int, int]]]:
    """Per frame, the ``(row, col)`` cells covered by a moving object (the same for both frames of a grid step).

    Object 1 (a red square) runs along row 1 left to right, one cell per grid step; object 2 (a black
    circle) runs down the last column, one cell per grid step (both wrap around).
    """
    cols, rows = _check(num_frames, size)
    cells = []
    for frame in range(num_frames):
        step = frame // FRAMES_PER_STEP
        cells.append([(1 % rows, step % cols), (step % rows, cols - 1)])
    return cells


def static_cells(num_frames: int = DEFAULT_NUM_FRAMES, size: tuple[int, int] = DEFAULT_SIZE) -> list[tuple[int, int]]:
    """Cells that no object ever covers: pure, unchanging background."""
    cols, rows = _check(num_frames, size)
    touched = {cell for frame in object_cells(num_frames, size) for cell in frame}
    return [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in touched]


def make_demo_frames(num_frames: int = DEFAULT_NUM_FRAMES, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """``uint8 [T, H, W, 3]``: the static textured background with the two moving objects drawn on top."""
    cols, rows = _check(num_frames, size)
    width, height = size
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    top, bottom, side = np.array([70, 120, 170]), np.array([200, 190, 120]), np.array([40, -30, 20])
    background = (top * (1 - y) + bottom * y + side * x).clip(0, 255).round().astype(np.uint8)
    scene = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(scene)
    # fixed decorations in the static cells (texture for the background tokens to differ spatially)
    for index, (r, c) in enumerate(static_cells(num_frames, size)):
        x0, y0 = c * CELL + 6, r * CELL + 6
        colour = PALETTE[("green", "yellow", "purple", "orange")[index % 4]]
        if index % 3 == 0:
            draw_shape(draw, "square", (x0, y0, x0 + 15, y0 + 15), colour)
        elif index % 3 == 1:
            draw_shape(draw, "triangle", (x0, y0, x0 + 16, y0 + 16), colour)
    frames = []
    for cells in object_cells(num_frames, size):
        frame = scene.copy()
        draw = ImageDraw.Draw(frame)
        (r1, c1), (r2, c2) = cells
        draw_shape(draw, "square", (c1 * CELL + 2, r1 * CELL + 2, c1 * CELL + CELL - 3, r1 * CELL + CELL - 3), PALETTE["red"])
        draw_shape(draw, "circle", (c2 * CELL + 2, r2 * CELL + 2, c2 * CELL + CELL - 3, r2 * CELL + CELL - 3), PALETTE["black"])
        frames.append(np.asarray(frame))
    return np.stack(frames)


def write_avi(path: Path, frames: np.ndarray, fps: float = DEFAULT_FPS) -> None:
    """Write ``uint8 [T, H, W, 3]`` RGB frames as an uncompressed AVI (24-bit BI_RGB, bottom-up BGR rows)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    count, height, width, _ = frames.shape
    stride = (width * 3 + 3) // 4 * 4
    frame_bytes = stride * height

    def encode(frame: np.ndarray) -> bytes:
        rows = frame[::-1, :, ::-1]  # bottom-up, BGR
        padded = np.zeros((height, stride), dtype=np.uint8)
        padded[:, : width * 3] = rows.reshape(height, width * 3)
        return padded.tobytes()

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def listing(kind: bytes, data: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(data) + 4) + kind + data

    rate_scale = (int(round(fps * 1000)), 1000)
    avih = struct.pack(
        "<IIIIIIIIII16x",
        int(round(1_000_000 / fps)),  # microseconds per frame
        int(frame_bytes * fps),  # max bytes per second
        0,  # padding granularity
        0x10,  # AVIF_HASINDEX
        count,
        0,  # initial frames
        1,  # streams
        frame_bytes,  # suggested buffer size
        width,
        height,
    )
    strh = struct.pack(
        "<4s4sIHHIIIIIIIIhhhh",
        b"vids",
        b"DIB ",
        0,  # flags
        0,  # priority
        0,  # language
        0,  # initial frames
        rate_scale[1],  # scale
        rate_scale[0],  # rate: fps = rate / scale
        0,  # start
        count,  # length in frames
        frame_bytes,  # suggested buffer size
        0xFFFFFFFF,  # quality: default
        frame_bytes,  # sample size
        0, 0, width, height,  # rcFrame
    )  # fmt: skip
    strf = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, frame_bytes, 0, 0, 0, 0)
    header = listing(b"hdrl", chunk(b"avih", avih) + listing(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))

    movi_chunks, index, offset = [], [], 4  # offsets are relative to the 'movi' fourcc
    for frame in frames:
        data = chunk(b"00db", encode(frame))
        index.append(struct.pack("<4sIII", b"00db", 0x10, offset, frame_bytes))  # AVIIF_KEYFRAME
        movi_chunks.append(data)
        offset += len(data)
    movi = listing(b"movi", b"".join(movi_chunks))
    idx1 = chunk(b"idx1", b"".join(index))
    body = b"AVI " + header + movi + idx1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}-", delete=False) as tmp:
        tmp.write(b"RIFF" + struct.pack("<I", len(body)) + body)
    os.replace(tmp.name, path)


def write_demo_video(
    path: Path, num_frames: int = DEFAULT_NUM_FRAMES, size: tuple[int, int] = DEFAULT_SIZE, fps: float = DEFAULT_FPS
) -> Path:
    """Write the demo video (:func:`make_demo_frames`) to ``path``; returns ``path``."""
    write_avi(Path(path), make_demo_frames(num_frames, size), fps)
    return Path(path)


def demo_video_path(num_frames: int = DEFAULT_NUM_FRAMES, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """The cached demo video (written on first use): ``<cache>/demo_video-v<VERSION>-<T>x<W>x<H>.avi``."""
    width, height = size
    path = cache_root() / f"demo_video-v{VERSION}-{num_frames}x{width}x{height}.avi"
    if not path.exists():
        write_demo_video(path, num_frames, size)
    return path
