"""The frame writer: each container holds the frames given, in order, at the rate given."""

import numpy as np
import pytest
from PIL import Image

from convrot_diffusers.metrics import psnr
from convrot_diffusers.video import mp4_available, video_extensions, write_video


def _frames(seed: int, count: int, size=(48, 32)) -> list[Image.Image]:
    """Smooth random frames (a lossy codec keeps them close), each unlike the others."""
    rng = np.random.default_rng(seed)
    width, height = size
    frames = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        frames.append(Image.fromarray(coarse).resize(size, Image.BILINEAR))
    return frames


def _read_pillow(path) -> tuple[list[Image.Image], list[int]]:
    image = Image.open(path)
    frames, durations = [], []
    for index in range(image.n_frames):
        image.seek(index)
        image.load()
        frames.append(image.convert("RGB"))
        durations.append(image.info["duration"])
    return frames, durations


def _read_mp4(path) -> tuple[list[Image.Image], float]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [Image.fromarray(np.frombuffer(raw, np.uint8).reshape(height, width, 3)) for raw in reader]
    return frames, meta["fps"]


def _assert_same_frames_in_order(written, read, floor_db):
    assert len(read) == len(written)
    for index, frame in enumerate(read):
        assert frame.size == written[index].size
        scores = [psnr(original, frame) for original in written]
        assert scores[index] > floor_db, (index, scores)
        assert int(np.argmax(scores)) == index, (index, scores)  # the frame at its own place, not another's


@pytest.mark.parametrize("suffix, fps, floor_db", [(".webp", 16, 30), (".gif", 8, 25), (".webp", 24, 30)])
def test_pillow_formats_hold_the_frames_in_order(tmp_path, seed, suffix, fps, floor_db):
    frames = _frames(seed, 7)
    path = write_video(frames, tmp_path / f"clip{suffix}", fps)
    read, durations = _read_pillow(path)
    _assert_same_frames_in_order(frames, read, floor_db)
    step = 10 if suffix == ".gif" else 1  # GIF stores centiseconds
    assert all(abs(duration - 1000 / fps) <= step for duration in durations), durations


@pytest.mark.skipif(not mp4_available(), reason="imageio-ffmpeg is not installed")
def test_mp4_holds_the_frames_in_order(tmp_path, seed):
    frames = _frames(seed, 9, size=(64, 48))
    path = write_video(frames, tmp_path / "clip.mp4", 12)
    read, fps = _read_mp4(path)
    _assert_same_frames_in_order(frames, read, 28)
    assert fps == 12


def test_one_frame_is_a_still(tmp_path, seed):
    frames = _frames(seed, 1)
    read, _ = _read_pillow(write_video(frames, tmp_path / "still.webp", 16))
    _assert_same_frames_in_order(frames, read, 30)


def test_extensions_and_bad_input(tmp_path, seed):
    assert video_extensions()[:2] == [".webp", ".gif"] and (".mp4" in video_extensions()) == mp4_available()
    frames = _frames(seed, 3)
    with pytest.raises(ValueError, match="unknown video extension '.avi'"):
        write_video(frames, tmp_path / "clip.avi", 16)
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "clip.webp", 16)
    with pytest.raises(ValueError, match="fps must be positive"):
        write_video(frames, tmp_path / "clip.webp", 0)
    with pytest.raises(ValueError, match="differ in size"):
        write_video([*frames, frames[0].resize((16, 16))], tmp_path / "clip.webp", 16)
    if mp4_available():
        with pytest.raises(ValueError, match="even width and height"):
            write_video([frame.resize((33, 32)) for frame in frames], tmp_path / "clip.mp4", 16)
    assert not any(tmp_path.iterdir())  # nothing written for bad input
