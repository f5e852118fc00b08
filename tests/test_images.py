import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import ImageError
from core.images import load_image, load_image_reduced


def _gradient(h=20, w=30):
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_become_rgb(tmp_path, mode):
    img = Image.fromarray(_gradient()).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    arr = load_image(path)
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8


def test_grayscale_values_are_kept(tmp_path):
    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    arr = load_image(tmp_path / "g.png")
    assert np.array_equal(arr[:, :, 0], _gradient()) and np.array_equal(arr[:, :, 1], arr[:, :, 2])


def test_rgba_transparent_pixels_are_composited_on_grey(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # opaque red, transparent rest
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = load_image(tmp_path / "a.png")
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 9]) == (128, 128, 128)


def test_16_bit_is_stretched_to_8_bit(tmp_path):
    a16 = (np.linspace(1000, 60000, 20 * 30).reshape(20, 30)).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "d.png")  # saved as mode I;16
    arr = load_image(tmp_path / "d.png")
    assert arr.dtype == np.uint8 and arr.min() <= 2 and arr.max() >= 253
    assert np.all(np.diff(arr[:, :, 0].ravel().astype(int)) >= 0)  # monotone ramp survives


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").shape == (30, 20, 3)


def test_bbox_crop(tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[10:20, 5:15] = 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr = load_image(tmp_path / "c.png", bbox=(5, 10, 10, 10))
    assert arr.shape == (10, 10, 3) and arr.min() == 255
    with pytest.raises(ImageError, match="outside"):
        load_image(tmp_path / "c.png", bbox=(100, 100, 5, 5))


def test_corrupt_and_empty_files_name_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageError, match=r"bad.jpg: cannot decode"):
        load_image(tmp_path / "bad.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="trunc.jpg"):
        load_image(tmp_path / "trunc.jpg")


def test_very_large_photo_is_read_and_a_pixel_bomb_refused(tmp_path, monkeypatch):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (90, 120, 60)).save(big, quality=70)
    assert load_image(big).shape == (4000, 6000, 3)
    # past twice PIL's pixel limit a file is refused as a decompression bomb: a named skip, not a crash
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageError, match="big.jpg: image too large"):
        load_image(big)


def _big_jpeg(path, h=3000, w=4000, exif=None):
    """A camera-size JPEG: grey, one white square at x 1000-1400, y 800-1200 (as displayed)."""
    rgb = np.full((h, w, 3), 90, np.uint8)
    rgb[800:1200, 1000:1400] = 255
    img = Image.fromarray(rgb)
    if exif is not None:  # stored rotated so that the viewer's rotation gives the array above
        img = img.transpose(Image.Transpose.ROTATE_270)
    img.save(path, quality=95, **({"exif": exif} if exif is not None else {}))


def test_large_jpeg_is_decoded_reduced_and_says_its_full_size(tmp_path):
    _big_jpeg(tmp_path / "big.jpg")
    full = load_image(tmp_path / "big.jpg")
    small, size = load_image_reduced(tmp_path / "big.jpg", min_side=512)
    assert full.shape == (3000, 4000, 3) and size == (3000, 4000)
    # 1/4 keeps the shorter side at 750 >= 512; 1/8 (375) would not
    assert small.shape == (750, 1000, 3)
    assert small[250, 300].min() > 240 and small[100, 100].max() < 100  # the square is where it was
    assert np.abs(small.astype(int) - cv2.resize(full, (1000, 750), interpolation=cv2.INTER_AREA)).mean() < 2
    assert load_image(tmp_path / "big.jpg", min_side=1500).shape == (1500, 2000, 3)
    assert load_image(tmp_path / "big.jpg", min_side=1501).shape == full.shape  # 1/2 would give 1500
    Image.fromarray(full).save(tmp_path / "big.png")  # only JPEG decoders reduce
    assert load_image_reduced(tmp_path / "big.png", min_side=512)[0].shape == full.shape


def test_reduced_decoding_follows_exif_orientation_and_bbox(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    _big_jpeg(tmp_path / "r.jpg", exif=exif)
    small, size = load_image_reduced(tmp_path / "r.jpg", min_side=512)
    assert size == (3000, 4000) and small.shape == (750, 1000, 3)
    assert small[250, 300].min() > 240
    # the square's bbox (as displayed): a crop of it, reduced while its shorter side stays >= 100
    crop, size = load_image_reduced(tmp_path / "r.jpg", bbox=(1000, 800, 400, 400), min_side=100)
    assert size == (400, 400) and crop.shape == (100, 100, 3) and crop[2:-2, 2:-2].min() > 240
    assert load_image(tmp_path / "r.jpg", bbox=(1000, 800, 400, 400)).shape == (400, 400, 3)
    # a bbox past the border counts what is inside the photo: 3990-4000 is 10 px wide, no reduction
    crop, size = load_image_reduced(tmp_path / "r.jpg", bbox=(3990, 0, 500, 3000), min_side=8)
    assert size == (3000, 10) and crop.shape == (3000, 10, 3)
