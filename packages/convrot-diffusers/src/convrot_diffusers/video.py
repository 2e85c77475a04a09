"""Writing a video pipeline's frames: animated WebP or GIF through Pillow, MP4 (H.264) through imageio-ffmpeg.

Pillow is a dependency already, so WebP and GIF always work. MP4 needs the optional extra
``convrot-diffusers[mp4]`` (imageio-ffmpeg: no dependencies of its own, its wheels carry a
static ffmpeg build, so nothing outside PyPI is needed); the CLI accepts ``.mp4`` only when it is
installed, and says how to install it otherwise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

PILLOW_FORMATS = {".webp": "WEBP", ".gif": "GIF"}
MP4 = ".mp4"
MP4_INSTALL = "pip install 'convrot-diffusers[mp4]' (imageio-ffmpeg)"
WEBP_QUALITY = 90
MP4_QUALITY = 8  # imageio-ffmpeg's 0-10 scale: 10 is the best; 8 keeps a 4-bit model's differences visible


def mp4_available() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def video_extensions() -> list[str]:
    """The extensions write_video accepts here (MP4 only where imageio-ffmpeg is installed)."""
    return [*PILLOW_FORMATS, *([MP4] if mp4_available() else [])]


def write_video(frames: Sequence[Image.Image], path: str | Path, fps: float) -> Path:
    """Writes ``frames`` (PIL images of one size) to ``path`` as .webp, .gif or .mp4, at ``fps`` frames a second."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not frames:
        raise ValueError("no frames to write")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = [frame.convert("RGB") for frame in frames]
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames differ in size: {sorted(sizes)}")
    if suffix in PILLOW_FORMATS:
        options = {"quality": WEBP_QUALITY} if suffix == ".webp" else {}
        frames[0].save(
            path,
            format=PILLOW_FORMATS[suffix],
            save_all=True,
            append_images=frames[1:],
            duration=round(1000 / fps),  # milliseconds per frame
            loop=0,
            **options,
        )
        return path
    if suffix == MP4:
        if not mp4_available():
            raise ValueError(f"writing MP4 needs imageio-ffmpeg: {MP4_INSTALL}")
        import imageio_ffmpeg

        width, height = frames[0].size
        if width % 2 or height % 2:
            raise ValueError(f"MP4 (yuv420p) needs an even width and height, got {width}x{height}")
        # macro_block_size=2: the frames are written at their own size, not rescaled to a multiple of 16.
        writer = imageio_ffmpeg.write_frames(
            str(path), (width, height), fps=fps, quality=MP4_QUALITY, codec="libx264", macro_block_size=2
        )
        writer.send(None)  # starts ffmpeg
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(np.asarray(frame)))
        finally:
            writer.close()
        return path
    raise ValueError(f"{path}: unknown video extension {path.suffix!r}; use {', '.join(video_extensions())}")
