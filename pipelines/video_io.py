"""Video input for the PruneVid pipeline: decord decoding and uniform frame sampling.

:func:`load_video` returns the sampled frames as ``uint8 [T, H, W, 3]`` plus a
``transformers.video_utils.VideoMetadata`` that tells the Qwen2.5-VL processor the real timing of the
sampled frames (``sampled_fps = T / total_frames * fps``), from which it derives
``second_per_grid_ts`` and so the temporal M-RoPE spacing.

Every way a video can be unusable raises one line that says what is wrong and what to do:
``FileNotFoundError`` for a missing path, ``ValueError`` for an empty or undecodable file and for
``num_frames`` outside ``1..frame count``.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pruning.common import check_int

__all__ = ["LoadedVideo", "uniform_frame_indices", "load_video"]


@dataclass
class LoadedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    indices: list[int]  # sampled frame indices in the file
    total_frames: int
    fps: float
    metadata: object  # transformers.video_utils.VideoMetadata

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps if self.fps else 0.0


@contextmanager
def _native_stderr_silenced():
    """Silence the C++ log lines decord's FFmpeg prints to fd 2 while opening a file (the error is re-raised as one line)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. some notebook frontends): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def uniform_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``[0, total_frames)``: the centre of each of ``num_frames`` equal spans.

    ``num_frames == total_frames`` gives every frame; indices are strictly increasing.
    """
    check_int("num_frames", num_frames, lo=1)
    if num_frames > total_frames:
        raise ValueError(
            f"num_frames={num_frames} is larger than the video's {total_frames} frames: pass num_frames <= {total_frames}"
        )
    return [int((i + 0.5) * total_frames / num_frames) for i in range(num_frames)]


def load_video(path: str | Path, num_frames: int) -> LoadedVideo:
    """Decode ``num_frames`` uniformly sampled RGB frames of ``path`` with decord."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video {str(path)!r} does not exist: pass the path of an existing video file")
    if path.is_dir():
        raise ValueError(f"video {str(path)!r} is a directory: pass the path of a video file")
    if path.stat().st_size == 0:
        raise ValueError(f"video {str(path)!r} is empty (0 bytes): pass a non-empty video file")
    check_int("num_frames", num_frames, lo=1)

    import decord
    from transformers.video_utils import VideoMetadata

    try:
        with _native_stderr_silenced():
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total = len(reader)
        fps = float(reader.get_avg_fps() or 0.0)
    except Exception as error:  # decord raises its own DECORDError / RuntimeError for unreadable files
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot decode video {str(path)!r} with decord ({first}): pass a readable video file (mp4, avi, mkv, ...)"
        ) from None
    if total < 1:
        raise ValueError(f"video {str(path)!r} has no frames: pass a video with at least one frame")
    indices = uniform_frame_indices(total, num_frames)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot decode frames of video {str(path)!r} ({first}): the file may be truncated") from None
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video {str(path)!r} decoded to an unexpected shape {frames.shape}: expected [T, H, W, 3] RGB")
    fps = fps if fps > 0 else 1.0
    metadata = VideoMetadata(
        total_num_frames=total,
        fps=fps,
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        duration=total / fps,
        frames_indices=indices,
    )
    return LoadedVideo(frames=frames, indices=indices, total_frames=total, fps=fps, metadata=metadata)
