import io

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from moderation.devkit.samples import draw_image, encode
from moderation.errors import Reason, Rejected
from moderation.model.imaging import CROP_SIZE, decode, normalise, prepare, preprocess
from tests.fixtures.models import LLAVA_PREPROCESSOR


@pytest.fixture(scope="module")
def reference() -> CLIPImageProcessor:
    return CLIPImageProcessor(**LLAVA_PREPROCESSOR)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (336, 336), (1000, 337), (120, 90), (2048, 1536)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_preprocess_matches_transformers_clip_processor(reference, size, fmt) -> None:
    image = decode(encode(draw_image(1, size), fmt), max_pixels=10**8).image
    ours = preprocess(image)
    theirs = reference(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, CROP_SIZE, CROP_SIZE)
    assert ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5


def test_prepare_gives_the_uint8_crop_that_normalises_to_preprocess() -> None:
    data = encode(draw_image(4, (640, 480)), "PNG")
    crop = prepare(data, max_pixels=10**8).pixels
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8 and crop.flags.c_contiguous
    assert np.array_equal(normalise(crop), preprocess(decode(data, max_pixels=10**8).image))
    # What a Triton request carries per image: a quarter of the float32 pixel_values it replaced.
    assert (crop.nbytes, normalise(crop).nbytes) == (338_688, 1_354_752)


def test_decode_reports_size_and_format() -> None:
    decoded = decode(encode(draw_image(2, (64, 48)), "PNG"), max_pixels=10_000)
    assert (decoded.width, decoded.height, decoded.format, decoded.image.mode) == (64, 48, "PNG", "RGB")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY_OBJECT),
        (b"hello, not an image", Reason.INVALID_IMAGE),
        (encode(draw_image(3, (200, 150)), "JPEG")[:600], Reason.INVALID_IMAGE),
        (encode(draw_image(3, (200, 150)), "PNG")[:900], Reason.INVALID_IMAGE),
    ],
)
def test_undecodable_bytes_are_rejected(data: bytes, reason: Reason) -> None:
    with pytest.raises(Rejected) as caught:
        decode(data, max_pixels=10**7)
    assert caught.value.reason == reason


def test_pixel_cap_is_checked_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buffer, format="PNG")  # 400 MP in a few hundred KB
    with pytest.raises(Rejected) as caught:
        decode(buffer.getvalue(), max_pixels=50_000_000)
    assert caught.value.reason == Reason.TOO_MANY_PIXELS


def test_palette_alpha_and_greyscale_images_become_rgb() -> None:
    for mode in ("P", "RGBA", "L", "LA", "CMYK"):
        buffer = io.BytesIO()
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        Image.new(mode, (40, 30)).save(buffer, format=fmt)
        assert decode(buffer.getvalue(), max_pixels=10_000).image.mode == "RGB"


def _jpeg(size: tuple[int, int], mode: str, **options: object) -> bytes:
    out = io.BytesIO()
    draw_image(size[0] * 7 + size[1], size).convert(mode).save(out, "JPEG", **options)
    return out.getvalue()


@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", [(336, 336), (337, 251), (1023, 769)])
def test_jpegs_decode_to_pillows_own_pixels(subsampling: int, progressive: bool, mode: str, size) -> None:
    """libjpeg-turbo through simplejpeg, straight into numpy, gives the pixels Pillow decodes: the exact path
    stays CLIP's reference, bit for bit (4:4:4, 4:2:2 and 4:2:0, baseline and progressive, grey, odd sizes)."""
    from moderation.model.imaging import jpeg_rgb, read_header

    data = _jpeg(size, mode, subsampling=subsampling, progressive=progressive, quality=85)
    header = read_header(data, max_pixels=10**8)
    decoded = jpeg_rgb(header)
    assert decoded is not None and decoded.shape == (size[1], size[0], 3)
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.array_equal(prepare(data, max_pixels=10**8).pixels, _pillow_crop(data))


def _pillow_crop(data: bytes) -> np.ndarray:
    from moderation.model.imaging import crop

    return crop(Image.open(io.BytesIO(data)).convert("RGB"))


def test_jpegs_libjpeg_warns_about_or_pillow_reads_otherwise_are_left_to_pillow() -> None:
    """A truncated JPEG (libjpeg only warns and pads it grey; Pillow refuses it) and a CMYK one are not decoded
    by simplejpeg: Pillow's rules decide, as before."""
    from moderation.model.imaging import jpeg_rgb, read_header

    whole = _jpeg((336, 336), "RGB")
    truncated = read_header(whole[: len(whole) * 2 // 3], max_pixels=10**8)
    assert jpeg_rgb(truncated) is None
    with pytest.raises(Rejected) as refused:
        prepare(whole[: len(whole) * 2 // 3], max_pixels=10**8)
    assert refused.value.reason == Reason.INVALID_IMAGE
    cmyk = _jpeg((64, 48), "CMYK")
    assert jpeg_rgb(read_header(cmyk, max_pixels=10**8)) is None
    assert prepare(cmyk, max_pixels=10**8).pixels.shape == (336, 336, 3)
