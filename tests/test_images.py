import itertools
import logging

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


def _big_jpeg(path, h=3000, w=4000, orientation=None):
    """A camera-size JPEG: grey, one white square at x 1000-1400, y 800-1200 as displayed (stored
    turned the other way when an EXIF orientation is given)."""
    rgb = np.full((h, w, 3), 90, np.uint8)
    rgb[800:1200, 1000:1400] = 255
    img = Image.fromarray(rgb)
    if orientation is None:
        img.save(path, quality=95)
        return
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    img.transpose(stored).save(path, quality=95, exif=exif)


def test_large_jpeg_is_decoded_reduced_and_says_where_it_lies(tmp_path):
    _big_jpeg(tmp_path / "big.jpg")
    full = load_image(tmp_path / "big.jpg")
    small, red = load_image_reduced(tmp_path / "big.jpg", min_side=512)
    assert full.shape == (3000, 4000, 3) and red.size == (3000, 4000)
    # 1/4 keeps the shorter side at 750 >= 512; 1/8 (375) would not. Decoded pixel i covers photo
    # pixels 4i to 4i + 3: its centre is at 4i + 1.5
    assert small.shape == (750, 1000, 3) and red.scale == 4 and red.offset == (1.5, 1.5)
    assert small[250, 300].min() > 240 and small[100, 100].max() < 100  # the square is where it was
    assert np.abs(small.astype(int) - cv2.resize(full, (1000, 750), interpolation=cv2.INTER_AREA)).mean() < 2
    assert load_image(tmp_path / "big.jpg", min_side=1500).shape == (1500, 2000, 3)
    assert load_image(tmp_path / "big.jpg", min_side=1501).shape == full.shape  # 1/2 would give 1500
    Image.fromarray(full).save(tmp_path / "big.png")  # only JPEG decoders reduce
    assert load_image_reduced(tmp_path / "big.png", min_side=512)[0].shape == full.shape


def test_positions_on_a_reduced_odd_sized_photo_map_to_the_full_photo(tmp_path):
    # 4001x3001 is no multiple of the reduction: the last decoded column stands for a partly empty
    # block, so stretching the decoded image over the photo would misplace points near the far edge
    rgb = np.full((3001, 4001, 3), 60, np.uint8)
    spots = [(20.5, 30.5), (2000.5, 1500.5), (3899.5, 2899.5)]  # centres of 2x2 white spots (x, y)
    for x, y in spots:
        rgb[int(y) - 8:int(y) + 10, int(x) - 8:int(x) + 10] = 255  # 18 px wide, centred on (x, y)
    # stored as displayed, turned half a turn, and a quarter turn either way (EXIF orientations):
    # the partly empty blocks then lie at the start of a displayed axis
    turns = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    for (orientation, turn), bbox in itertools.product(turns.items(), (None, (7, 13, 3990, 2985))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        img = Image.fromarray(rgb)
        (img.transpose(turn) if turn else img).save(tmp_path / "odd.jpg", quality=95, exif=exif)
        small, red = load_image_reduced(tmp_path / "odd.jpg", bbox, min_side=300)
        assert red.scale == 8
        for x, y in spots:
            x, y = (x - 7, y - 13) if bbox else (x, y)
            # the spot's centroid on the decoded image, mapped back
            gx, gy = int(round((x - red.offset[0]) / 8)), int(round((y - red.offset[1]) / 8))
            win = small[max(0, gy - 4):gy + 5, max(0, gx - 4):gx + 5, 0].astype(float) - 60
            ys, xs = np.mgrid[max(0, gy - 4):gy + 5, max(0, gx - 4):gx + 5]
            cx, cy = (win * xs).sum() / win.sum(), (win * ys).sum() / win.sum()
            fx, fy = red.to_full(np.array([[cx, cy]]))[0]
            assert abs(fx - x) < 1.5 and abs(fy - y) < 1.5, (orientation, bbox, (x, y), (fx, fy))


def test_reduced_decoding_follows_exif_orientation_and_bbox(tmp_path):
    for orientation in (6, 8):
        _big_jpeg(tmp_path / "r.jpg", orientation=orientation)
        small, red = load_image_reduced(tmp_path / "r.jpg", min_side=512)
        assert red.size == (3000, 4000) and small.shape == (750, 1000, 3)
        assert small[250, 300].min() > 240 and small[100, 100].max() < 100
        # the square's bbox (as displayed): a crop of it, reduced while its shorter side stays >= 100
        crop, red = load_image_reduced(tmp_path / "r.jpg", bbox=(1000, 800, 400, 400), min_side=100)
        assert red.size == (400, 400) and crop.shape == (100, 100, 3) and crop[2:-2, 2:-2].min() > 240
        assert load_image(tmp_path / "r.jpg", bbox=(1000, 800, 400, 400)).shape == (400, 400, 3)
        # a bbox past the displayed border counts what is inside the photo: x 3990-4000, no reduction
        crop, red = load_image_reduced(tmp_path / "r.jpg", bbox=(3990, 0, 500, 3000), min_side=8)
        assert red.size == (3000, 10) and crop.shape == (3000, 10, 3)
        # 2000 px wide inside the photo (4000 in the stored one's axes): 1/2, not 1/4 (500 < 512)
        crop, red = load_image_reduced(tmp_path / "r.jpg", bbox=(2000, 0, 2500, 3000), min_side=512)
        assert red.size == (3000, 2000) and min(crop.shape[:2]) >= 512


def test_a_square_reduction_of_a_turned_photo_keeps_its_size(tmp_path):
    _big_jpeg(tmp_path / "s.jpg", h=3993, w=4000, orientation=6)  # decoded at 1/8: 500x500
    small, red = load_image_reduced(tmp_path / "s.jpg", min_side=384)
    assert small.shape == (500, 500, 3) and red.size == (3993, 4000)


def test_camera_files_with_preview_images_are_reduced_too(tmp_path):
    _big_jpeg(tmp_path / "a.jpg")
    img = Image.open(tmp_path / "a.jpg")
    img.save(tmp_path / "m.jpg", format="MPO", save_all=True, append_images=[img.resize((160, 120))])
    assert Image.open(tmp_path / "m.jpg").format == "MPO"
    assert load_image(tmp_path / "m.jpg", min_side=512).shape == (750, 1000, 3)


def test_a_bbox_reaching_past_the_photo_is_cropped_with_one_warning(tmp_path, caplog):
    _big_jpeg(tmp_path / "t.jpg", h=300, w=400, orientation=6)  # displayed 400x300, stored 300x400
    with caplog.at_level("WARNING", logger="core.images"):
        for _ in range(2):  # the embedding and the keypoints both read it: warned once
            crop = load_image(tmp_path / "t.jpg", bbox=(20, 10, 250, 380))  # rows 10-390 of 300: 290 inside
        assert crop.shape == (290, 250, 3)
        load_image(tmp_path / "t.jpg", bbox=(10, 10, 300, 200))  # inside: no warning
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "bbox (20, 10, 250, 380) reaches past the 400x300 photo" in warned[0]
    # 250x380 fits the photo as stored (300x400): the box was probably measured before the rotation
    assert "76% of it is inside" in warned[0] and "before its EXIF rotation" in warned[0]


def test_a_thumbnail_is_read_with_a_warning_once(tmp_path, caplog):
    """A 10x10 photo (or one whose box is that small) cannot show a coat pattern: read, said once."""
    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(tmp_path / "ok.png")
    with caplog.at_level(logging.WARNING):
        assert load_image(tmp_path / "tiny.png").shape == (10, 10, 3)
        load_image(tmp_path / "tiny.png")
        load_image(tmp_path / "ok.png")
        load_image(tmp_path / "ok.png", bbox=(0, 0, 40, 30))
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{tmp_path / 'tiny.png'}: only 10x10 pixels (a thumbnail?): too few to tell animals apart by, "
                      "so its answers mean little",
                      f"{tmp_path / 'ok.png'}: only 40x30 pixels in its bbox (a thumbnail?): too few to tell animals "
                      "apart by, so its answers mean little"], warned
