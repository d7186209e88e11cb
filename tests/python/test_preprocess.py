"""`llama3v preprocess` against transformers' `SiglipImageProcessorPil`.

Every case writes an image file, runs the binary on it and compares the `.npy` it writes
with the processor's `pixel_values` for `PIL.Image.open` of the same file (the reference
path). Both of the runtime's paths are compared: the default one, rows resized as they are
decoded (`decode_image_resized`, the path `generate` and `serve` take), and `--whole-image`
(decode, then resize: the path `check` takes). The docs claim bit-identical values, so every
case must be exact (max abs diff 0) except the documented differences in KNOWN_DIFFERENCES,
which must stay within one 8-bit level after normalization (1/127.5). Per case it prints
the largest absolute difference beside the tolerance and the fraction of identical levels.

Run: cargo build -p llama3v-cli && .venv/bin/python -m pytest tests/python/test_preprocess.py -s
The binary is target/debug/llama3v unless LLAMA3V_BIN names another.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("LLAMA3V_BIN", REPO / "target" / "debug" / "llama3v"))
TOLERANCE = 1 / 127.5
MIN_IDENTICAL = 0.999
SIZES = [(384, 384), (336, 512)]  # (height, width)


def binary() -> Path:
    if not BIN.is_file():
        pytest.fail(f"{BIN} not found: build it with `cargo build -p llama3v-cli` or set LLAMA3V_BIN")
    return BIN


def run_preprocess(image: Path, out: Path, height: int, width: int, *extra: str) -> np.ndarray:
    cmd = [str(binary()), "preprocess", "--image", str(image), "--size", f"{height}x{width}", "--out", str(out)]
    cmd += extra
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return np.load(out)


def reference(image: Path, height: int, width: int) -> np.ndarray:
    processor = transformers.SiglipImageProcessorPil(size={"height": height, "width": width})
    with Image.open(image) as im:
        return processor(images=im, return_tensors="np")["pixel_values"][0]


def levels(values: np.ndarray) -> np.ndarray:
    """The 8-bit levels behind SigLIP's (x/255 - 0.5)/0.5 values."""
    return np.round((values.astype(np.float64) * 0.5 + 0.5) * 255).astype(np.int64)


# --- image writers -------------------------------------------------------------------


def png_bytes(
    arr: np.ndarray,
    color_type: int,
    bit_depth: int,
    extra_chunks: bytes = b"",
    claimed_size: tuple[int, int] | None = None,
) -> bytes:
    """A PNG Pillow cannot write (16-bit colour, low bit depths, tRNS on grey/RGB, lying header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    h, w = arr.shape[:2]
    if bit_depth == 16:
        rows = [arr[y].astype(">u2").tobytes() for y in range(h)]
    elif bit_depth == 8:
        rows = [arr[y].astype(np.uint8).tobytes() for y in range(h)]
    else:
        rows = [
            np.packbits(np.unpackbits(arr[y].astype(np.uint8)[:, None], axis=1)[:, -bit_depth:]).tobytes()
            for y in range(h)
        ]
    raw = b"".join(b"\x00" + r for r in rows)
    cw, ch = claimed_size or (w, h)
    ihdr = struct.pack(">IIBBBBB", cw, ch, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra_chunks
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def trns(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + b"tRNS" + data + struct.pack(">I", zlib.crc32(b"tRNS" + data))


def pil_save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, edges and some noise, at any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (width / 7 + 1)) * np.cos(y / (height / 5 + 1)),
            128 + 90 * np.cos((x + y) / (width / 9 + 1)),
            (x * 255 / max(width - 1, 1) + (y > height / 2) * 60) % 256,
        ],
        axis=-1,
    )
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def rgba_with_alpha(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    alpha = ((x * 255 // max(w - 1, 1)) ^ (y * 7 % 256)).astype(np.uint8)
    alpha[: h // 4, : w // 4] = 0
    alpha[-(h // 4) :, -(w // 4) :] = 255
    return np.dstack([rgb, alpha])


def orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def build_cases() -> dict[str, bytes]:
    astronaut = skimage_data.astronaut()
    chelsea = skimage_data.chelsea()
    coffee = skimage_data.coffee()
    camera = skimage_data.camera()
    rocket = skimage_data.rocket()
    hubble = skimage_data.hubble_deep_field()
    logo = skimage_data.logo()  # RGBA
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)

    rgb = Image.fromarray(astronaut)
    cases: dict[str, bytes] = {}

    # JPEG: photographs, subsampling modes, progressive, greyscale, CMYK, EXIF orientation.
    cases["astronaut_q90.jpg"] = pil_save(rgb, "JPEG", quality=90)
    cases["chelsea_q75.jpg"] = pil_save(Image.fromarray(chelsea), "JPEG", quality=75)
    cases["coffee_444.jpg"] = pil_save(Image.fromarray(coffee), "JPEG", quality=92, subsampling=0)
    cases["rocket_422.jpg"] = pil_save(Image.fromarray(rocket), "JPEG", quality=85, subsampling=1)
    cases["hubble_progressive.jpg"] = pil_save(Image.fromarray(hubble), "JPEG", quality=90, progressive=True)
    cases["coffee_restart_markers.jpg"] = pil_save(Image.fromarray(coffee), "JPEG", quality=90, restart_marker_blocks=4)
    cases["camera_grey.jpg"] = pil_save(Image.fromarray(camera), "JPEG", quality=90)
    cases["coffee_cmyk.jpg"] = pil_save(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=90)
    cases["chelsea_exif_rotate90.jpg"] = pil_save(
        Image.fromarray(chelsea), "JPEG", quality=90, exif=orientation_exif(6)
    )
    cases["odd_17x9.jpg"] = pil_save(Image.fromarray(smooth_photo(17, 9, 3)), "JPEG", quality=90)
    cases["large_4000x3000.jpg"] = pil_save(Image.fromarray(smooth_photo(4000, 3000, 4)), "JPEG", quality=90)

    # PNG: every colour type Pillow and the processor treat differently.
    cases["astronaut_rgb.png"] = pil_save(rgb, "PNG")
    cases["logo_rgba.png"] = pil_save(Image.fromarray(logo), "PNG")
    cases["chelsea_rgba_alpha.png"] = pil_save(Image.fromarray(rgba_with_alpha(chelsea)), "PNG")
    palette = Image.fromarray(coffee).quantize(64)
    cases["coffee_palette.png"] = pil_save(palette, "PNG")
    cases["coffee_palette_transparency.png"] = pil_save(palette, "PNG", transparency=0)
    cases["logo_palette_alpha.png"] = pil_save(Image.fromarray(logo).quantize(32), "PNG")
    cases["camera_l.png"] = pil_save(Image.fromarray(camera), "PNG")
    la = np.dstack([camera, np.asarray(Image.fromarray(camera).transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    cases["camera_la.png"] = pil_save(Image.fromarray(la, "LA"), "PNG")
    cases["horse_1bit.png"] = pil_save(Image.fromarray(skimage_data.horse()), "PNG")
    wide16 = astronaut.astype(np.uint16) * 257 + rng.integers(0, 257, astronaut.shape).astype(np.uint16)
    cases["astronaut_rgb16.png"] = png_bytes(wide16, 2, 16)
    rgba16 = np.dstack([wide16, (rgba_with_alpha(astronaut)[..., 3].astype(np.uint16) * 257)])
    cases["astronaut_rgba16.png"] = png_bytes(rgba16, 6, 16)
    cases["camera_la16.png"] = png_bytes(np.dstack([camera, 255 - camera]).astype(np.uint16) * 257, 4, 16)
    # Pillow opens 16-bit grey as I;16 and clips it to 255 when converting to RGB.
    grey16 = (camera.astype(np.uint16) * 3).clip(0, 600)
    cases["camera_grey16_small_values.png"] = png_bytes(grey16, 0, 16)
    cases["camera_grey16_trns.png"] = png_bytes(grey16, 0, 16, trns(struct.pack(">H", 90)))
    cases["camera_grey4bit.png"] = png_bytes(camera >> 4, 0, 4)
    cases["camera_grey2bit.png"] = png_bytes(camera >> 6, 0, 2)
    cases["noise_rgb_trns.png"] = png_bytes(noise, 2, 8, trns(struct.pack(">HHH", *[int(v) for v in noise[5, 7]])))
    cases["coffee_rgb16_trns.png"] = png_bytes(
        coffee.astype(np.uint16) * 257, 2, 16, trns(struct.pack(">HHH", *[int(v) * 257 for v in coffee[5, 7]]))
    )
    cases["camera_grey_trns.png"] = png_bytes(camera, 0, 8, trns(struct.pack(">H", int(camera[100, 100]))))

    # WebP, GIF, BMP.
    cases["astronaut_lossy.webp"] = pil_save(rgb, "WEBP", quality=80)
    cases["astronaut_lossless.webp"] = pil_save(rgb, "WEBP", lossless=True)
    cases["logo_lossless_alpha.webp"] = pil_save(Image.fromarray(logo), "WEBP", lossless=True)
    cases["chelsea_lossy_alpha.webp"] = pil_save(Image.fromarray(rgba_with_alpha(chelsea)), "WEBP", quality=85)
    cases["coffee.gif"] = pil_save(palette, "GIF")
    cases["coffee_transparency.gif"] = pil_save(palette, "GIF", transparency=3)
    frames = [Image.fromarray(np.roll(coffee, 40 * i, axis=1)) for i in range(3)]
    cases["coffee_animated.gif"] = pil_save(
        frames[0].quantize(64), "GIF", save_all=True, append_images=[f.quantize(64) for f in frames[1:]]
    )
    cases["coffee_animated.webp"] = pil_save(frames[0], "WEBP", save_all=True, append_images=frames[1:], quality=80)
    cases["camera_grey_transparency.gif"] = pil_save(Image.fromarray(camera), "GIF", transparency=int(camera[0, 0]))
    cases["astronaut.bmp"] = pil_save(rgb, "BMP")
    cases["logo_rgba.bmp"] = pil_save(Image.fromarray(logo), "BMP")
    cases["coffee_palette.bmp"] = pil_save(palette, "BMP")
    cases["horse_1bit.bmp"] = pil_save(Image.fromarray(skimage_data.horse()), "BMP")

    # Sizes: single pixel, tiny, extreme aspect ratios, exactly the target, upscale.
    cases["one_pixel.png"] = pil_save(Image.new("RGB", (1, 1), (12, 200, 77)), "PNG")
    cases["one_pixel_rgba.png"] = pil_save(Image.new("RGBA", (1, 1), (12, 200, 77, 90)), "PNG")
    cases["tiny_3x2.png"] = pil_save(Image.fromarray(noise[:2, :3]), "PNG")
    cases["noise_97x131.png"] = pil_save(Image.fromarray(noise), "PNG")
    cases["wide_2000x3.png"] = pil_save(Image.fromarray(smooth_photo(2000, 3, 5)), "PNG")
    cases["tall_5x1500.png"] = pil_save(Image.fromarray(smooth_photo(5, 1500, 6)), "PNG")
    cases["tall_600x2400.jpg"] = pil_save(Image.fromarray(smooth_photo(600, 2400, 7)), "JPEG", quality=90)
    cases["exact_384x384.png"] = pil_save(Image.fromarray(smooth_photo(384, 384, 8)), "PNG")
    cases["exact_512x336.png"] = pil_save(Image.fromarray(smooth_photo(512, 336, 9)), "PNG")
    cases["upscale_40x30.png"] = pil_save(Image.fromarray(smooth_photo(40, 30, 10)), "PNG")
    return cases


CASES = build_cases()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for name, data in CASES.items():
        (d / name).write_bytes(data)
    return d


# Cases the docs name as differing from the reference (runtime/src/preprocess.rs, "Known differences").
KNOWN_DIFFERENCES: dict[str, str] = {}


@pytest.mark.parametrize("path", ["streamed", "whole-image"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_siglip_processor(image_dir: Path, tmp_path: Path, name: str, size: tuple[int, int], path: str) -> None:
    height, width = size
    image = image_dir / name
    extra = ["--whole-image"] if path == "whole-image" else []
    got = run_preprocess(image, tmp_path / "out.npy", height, width, *extra)
    want = reference(image, height, width)

    assert got.dtype == np.float32
    assert got.shape == want.shape == (3, height, width)
    max_diff = float(np.abs(got - want).max())
    identical = float((levels(got) == levels(want)).mean())
    tolerance = TOLERANCE if name in KNOWN_DIFFERENCES else 0.0
    print(
        f"\n{name:36s} {height}x{width} {path:11s} max|diff| {max_diff:.6f} (tolerance {tolerance:.6f})"
        f"  identical levels {identical:.5%}  exact floats {bool((got == want).all())}"
    )
    assert max_diff <= tolerance
    if name in KNOWN_DIFFERENCES:
        assert identical >= MIN_IDENTICAL


BAD_INPUTS = {
    "empty.png": b"",
    "not_an_image.jpg": b"this is plain text, not a JPEG\n" * 4,
    "truncated.png": pil_save(Image.fromarray(skimage_data.astronaut()), "PNG")[:5000],
    "truncated.jpg": pil_save(Image.fromarray(skimage_data.astronaut()), "JPEG")[:3000],
    "corrupt.gif": b"GIF89a" + bytes(range(256)) * 3,
    # A well-formed header claiming 100000 x 100000 pixels: must fail on the header.
    "bomb.png": png_bytes(np.zeros((1, 1), np.uint8), 0, 8, claimed_size=(100_000, 100_000)),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_fails_with_file_and_reason(tmp_path: Path, name: str) -> None:
    image = tmp_path / name
    image.write_bytes(BAD_INPUTS[name])
    cmd = [str(binary()), "preprocess", "--image", str(image), "--size", "384", "--out", str(tmp_path / "o.npy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    print(f"\n{name}: exit {proc.returncode}: {proc.stderr.strip()}")
    assert proc.returncode != 0
    assert name in proc.stderr
    assert "panicked" not in proc.stderr
    assert not (tmp_path / "o.npy").exists()


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    cmd = [str(binary()), "preprocess", "--image", str(missing), "--out", str(tmp_path / "o.npy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "missing.png" in proc.stderr
