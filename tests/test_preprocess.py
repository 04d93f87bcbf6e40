"""Preprocessing follows the manifest exactly: resize the short side, centre-crop, (x/255 - mean)/std, CHW."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from skill_edge.runtime.rom.preprocess import ImageDecodeError, Preprocessing


def reference(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """The textbook formula, written the slow and obvious way."""
    w, h = im.size
    scale = pre.resize / min(w, h)
    nw, nh = max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))
    im = im.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - pre.crop) // 2, (nh - pre.crop) // 2
    x = np.asarray(im.crop((left, top, left + pre.crop, top + pre.crop)), dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@pytest.mark.parametrize("size", [(160, 210), (300, 200), (64, 64), (1000, 40)])
@pytest.mark.parametrize("norm", [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_matches_the_formula_bit_for_bit(tmp_path, size, norm) -> None:
    rng = np.random.default_rng(sum(size))
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path = tmp_path / "x.png"  # lossless, so the file decodes to exactly these pixels
    im.save(path)
    pre = Preprocessing(256, 224, "bicubic", *norm)
    got = pre(path)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32 and got.flags.c_contiguous
    # x / 255 and x * (1 / 255) may differ in the last bit; nothing more
    np.testing.assert_allclose(got, reference(im, pre), rtol=0, atol=1e-6)


def test_grey_and_rgba_inputs_become_rgb(tmp_path) -> None:
    pre = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    for mode in ("L", "RGBA", "P"):
        p = tmp_path / f"{mode}.png"
        Image.new(mode, (50, 70)).save(p)
        assert pre(p).shape == (3, 224, 224)


def test_garbage_is_an_image_decode_error(tmp_path) -> None:
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)(p)


class _RecordingPre:
    """A stand-in preprocessing callable that notes the nice value of the thread decoding each item."""

    crop = 8

    def __init__(self) -> None:
        self.nice: list[int] = []

    def __call__(self, item) -> np.ndarray:
        import os
        import threading

        self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return np.full((3, 8, 8), float(item), np.float32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
@pytest.mark.parametrize("nice", [0, 5, 19, 40])
def test_decode_threads_run_at_the_asked_nice_and_leave_the_caller_alone(nice: int) -> None:
    import os

    from skill_edge.runtime.rom.preprocess import iter_batches

    before = os.getpriority(os.PRIO_PROCESS, 0)
    pre = _RecordingPre()
    batches = list(iter_batches(range(10), pre, batch_size=4, workers=2, nice=nice))
    assert [b.x[:, 0, 0, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert set(pre.nice) == {min(19, before + nice)}  # capped at 19
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


# ---------------------------------------------------------------------------- decoding real-world files
PRE = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)


def _photo(tmp_path, size: tuple[int, int], name: str = "photo.jpg", **save) -> tuple[Image.Image, "object"]:
    """A real photograph (scikit-learn's sample) scaled to a camera's size and saved as a JPEG."""
    from sklearn.datasets import load_sample_image

    im = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC)
    path = tmp_path / name
    im.save(path, "JPEG", quality=92, **save)
    return im, path


def test_a_large_jpeg_is_decoded_at_reduced_scale_never_below_the_target(tmp_path) -> None:
    """libjpeg's draft mode must be set before the pixels are read (decoder 1 set it after: no effect)."""
    from skill_edge.runtime.rom.preprocess import _open

    _, path = _photo(tmp_path, (4032, 3024))  # a 12-megapixel phone photo
    assert PRE._target_size(4032, 3024) == (341, 256)
    assert PRE._draft_size(4032, 3024) == (682, 512)
    assert _open(path, PRE._draft_size).size == (1008, 756)  # 1/4 scale: the smallest that covers the draft size
    _, small = _photo(tmp_path, (1000, 667), "small.jpg")  # under twice the draft size: decoded whole
    assert _open(small, PRE._draft_size).size == (1000, 667)
    assert Image.open(path).size == (4032, 3024) and PRE(path).shape == (3, 224, 224)


def test_draft_decoding_keeps_the_features(tmp_path, rom_engine) -> None:
    """On the real ROM the reduced decode gives the features of the full one (cosine >= 0.999)."""
    _, path = _photo(tmp_path, (3000, 2000))
    full = Image.open(path)
    full.load()  # the full-resolution decode, as decoder 1 did it
    a, b = rom_engine.features(np.stack([rom_engine.preprocess(path), rom_engine.preprocess(full)]))
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.999


def test_exif_orientation_is_applied(tmp_path) -> None:
    im, plain = _photo(tmp_path, (320, 240))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _, turned = _photo(tmp_path, (320, 240), "turned.jpg", exif=exif)
    upright = Image.open(plain).transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_allclose(PRE(turned), PRE(upright), rtol=0, atol=1e-6)
    assert not np.allclose(PRE(turned), PRE(plain), atol=0.1)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path) -> None:
    """A 16-bit PNG (medical scans, depth cameras) reads as its 8-bit version, not as a white page."""
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (120, 90), dtype=np.uint16)
    Image.fromarray((v * 257).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(v.astype(np.uint8)).save(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(PRE(tmp_path / "deep.png"), PRE(tmp_path / "flat.png"))


def test_a_large_camera_frame_is_box_reduced_first_and_keeps_its_features(rom_engine) -> None:
    """A 1080p frame (an RGB array, as a video source yields it) is reduced by a whole factor before the
    bicubic resample; the ROM features stay within cosine 0.998 of the full resample's.  A 720p frame,
    under 4x the target, is resampled exactly as before."""
    import dataclasses

    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg"))
    full = dataclasses.replace(PRE, draft=False)
    small = np.asarray(photo.resize((1280, 720), Image.BICUBIC))
    np.testing.assert_array_equal(PRE(small), full(small))
    frame = np.asarray(photo.resize((1920, 1080), Image.BICUBIC))
    assert not np.array_equal(PRE(frame), full(frame))
    a, b = rom_engine.features(np.stack([rom_engine.preprocess(frame),
                                         dataclasses.replace(rom_engine.preprocessing, draft=False)(frame)]))
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.998
