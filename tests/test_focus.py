"""The focus map (where the animal is) and the keypoints kept in focus."""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict, replace

import numpy as np
import pytest

from keypoints.features import KeypointConfig, config_from_dict, config_to_dict, extract_keypoints, in_focus
from siamese.focus import FocusMap


def textured(h: int = 240, w: int = 360, seed: int = 0) -> np.ndarray:
    """Random black and white blocks everywhere: SIFT finds keypoints all over the photo."""
    rng = np.random.default_rng(seed)
    blocks = (rng.random((h // 6, w // 6)) > 0.5).astype(np.uint8) * 255
    gray = np.kron(blocks, np.ones((6, 6), np.uint8))
    return np.repeat(gray[:, :, None], 3, axis=2)


def left_half(image: np.ndarray) -> np.ndarray:
    """A focus map at the photo's own size: 1 on the left half, 0 on the right."""
    m = np.zeros(image.shape[:2], np.float32)
    m[:, : image.shape[1] // 2] = 1
    return m


def test_keypoints_are_kept_where_the_focus_map_is_high():
    img = textured()
    cfg = KeypointConfig(max_keypoints=300, focus_keep=0.5, focus_candidates=3000)
    whole = extract_keypoints(img, cfg)  # no map given: the whole photo
    kept = extract_keypoints(img, cfg, focus=left_half)
    assert (whole.xy[:, 0] >= 180).sum() > 50  # the plain extraction finds keypoints on the right too
    assert len(kept) == 300 and (kept.xy[:, 0] < 180).all()
    # the cap applies after the cut: more keypoints on the left than the plain extraction kept there
    assert len(kept) > (whole.xy[:, 0] < 180).sum()
    # strongest first, as without focus
    assert np.allclose(np.linalg.norm(kept.desc, axis=1), 1, atol=1e-5)
    # focus_keep 1 means the whole photo, map or not
    assert np.array_equal(extract_keypoints(img, replace(cfg, focus_keep=1.0), focus=left_half).xy, whole.xy)


def test_in_focus_stretches_a_coarse_map_over_the_photo():
    coarse = np.array([[0, 0, 1, 1]], np.float32)  # right half high, at a quarter of the resolution
    xy = np.array([[10, 5], [90, 40], [390, 10], [300, 70]], np.float32)
    assert in_focus(xy, coarse, (80, 400), 0.5).tolist() == [False, False, True, True]
    assert in_focus(xy, coarse, (80, 400), 1.0).all()


def test_focus_map_is_high_on_texture_and_pickles_as_its_settings():
    """Known answer: a photo half plain grey, half textured; the ImageNet network responds to the
    texture. A Ray worker receives the settings only (bytes, not a network) and builds the same map."""
    img = np.full((240, 360, 3), 128, np.uint8)
    img[:, 180:] = textured()[:, 180:]
    focus = FocusMap()
    m = focus(img)
    assert m.ndim == 2 and m.shape[1] > m.shape[0] > 4  # coarse, as wide as the input
    left, right = m[:, : m.shape[1] // 3].mean(), m[:, -m.shape[1] // 3:].mean()
    assert right > 2 * left
    blob = pickle.dumps(focus)
    assert len(blob) < 1000
    assert np.array_equal(pickle.loads(blob)(img), m)


def test_a_run_from_before_the_focus_keeps_the_whole_photo(tmp_path):
    """config.json written before the focus settings existed: keypoints from the whole photo, as its
    validator was fitted on; a stage asked for focus without a map is a programming error."""
    from core.runfolder import RunFolder
    from keypoints.stage import KeypointStage
    from keypoints.verify import VerifyConfig

    # (before the upright setting too: recorded only when on, see test_keypoints)
    old = {k: v for k, v in asdict(KeypointConfig()).items() if not k.startswith("focus") and k != "upright"}
    assert config_from_dict(old).focus_keep == 1.0
    assert config_from_dict(asdict(KeypointConfig())).focus_keep == KeypointConfig().focus_keep < 1
    # without focus the settings are recorded (and fingerprint the caches) as before it existed
    assert config_to_dict(replace(KeypointConfig(), focus_keep=1.0)) == old
    assert config_to_dict(KeypointConfig()) == {k: v for k, v in asdict(KeypointConfig()).items() if k != "upright"}
    run = RunFolder(tmp_path / "run")
    assert KeypointStage(run, config_from_dict(old), VerifyConfig(), None).focus is None
    with pytest.raises(ValueError, match="focus map"):
        KeypointStage(run, KeypointConfig(), VerifyConfig(), None)
    stage = KeypointStage(run, KeypointConfig(), VerifyConfig(), None, focus=FocusMap())
    assert stage.config()["focus"] == FocusMap().name
    assert stage.store.cfg.focus_keep == 0.5
    # a bare store has no map: it extracts from the whole photo and its cache fingerprint says so
    from keypoints.store import KeypointStore

    assert KeypointStore(tmp_path / "kp", KeypointConfig()).cfg.focus_keep == 1.0


def test_focus_box_surrounds_the_weight_of_the_map():
    """Known answers on hand-made maps: a blob's box, a flat map, a single hot cell (minimum side)."""
    from siamese.focus import focus_box

    m = np.zeros((10, 20), np.float32)
    m[2:6, 4:10] = 1  # cells 4..9 across (centre 7, sd 1.71), 2..5 down (centre 4, sd 1.12)
    x0, y0, x1, y1 = focus_box(m, (100, 400), k=2.0)
    sx, sy = np.sqrt(35 / 12), np.sqrt(15 / 12)  # sd of a uniform run of 6 and of 4 cells
    assert (x0, x1) == (int((7 - 2 * sx) * 20), int(np.ceil((7 + 2 * sx) * 20)))
    assert (y0, y1) == (int((4 - 2 * sy) * 10), int(np.ceil((4 + 2 * sy) * 10)))
    assert focus_box(np.ones((10, 20)), (100, 400)) == (0, 0, 400, 100)  # nothing stands out
    hot = np.zeros((10, 20))
    hot[0, 19] = 5  # one cell in the corner: a quarter of each side, inside the photo
    assert focus_box(hot, (100, 400)) == (300, 0, 400, 25)


def test_focus_crop_keeps_the_textured_part_of_a_photo():
    """The model's crop (siamese.embed.load_for_model) on a photo textured in its middle only."""
    from siamese.focus import focus_crop

    img = np.full((240, 360, 3), 128, np.uint8)
    img[60:180, 90:270] = textured()[60:180, 90:270]
    crop = focus_crop(img)
    assert crop.shape[0] * crop.shape[1] < 0.7 * img.shape[0] * img.shape[1]
    assert (crop != 128).mean() > 2 * (img != 128).mean()  # mostly texture now


def test_the_network_embeds_the_box_and_trains_on_the_whole_photo(tmp_path):
    """crop="focus": the photo is embedded inside its focus box unless the catalog gives a bbox;
    crop="none" embeds the whole photo; training decodes the whole photo in every case."""
    import cv2

    from core.catalog import Record
    from siamese.config import ModelConfig
    from siamese.embed import load_for_model
    from siamese.trainer import _load_resized

    img = np.full((240, 360, 3), 128, np.uint8)
    img[60:180, 90:270] = textured()[60:180, 90:270]
    path = tmp_path / "p.png"
    cv2.imwrite(str(path), img)
    rec = Record(image="p.png", path=path, individual_id="a")
    focus, whole = ModelConfig(input_size=(64, 96)), ModelConfig(input_size=(64, 96), crop="none")
    assert focus.crop == "focus"  # the default
    boxed = load_for_model(rec, focus)
    assert boxed.shape[0] * boxed.shape[1] < 0.7 * 240 * 360
    assert load_for_model(rec, whole).shape == (240, 360, 3)
    given = Record(image="p.png", path=path, individual_id="a", bbox=(10, 20, 100, 50))
    assert load_for_model(given, focus).shape == (50, 100, 3)  # the catalog's box wins
    trained = _load_resized(rec, focus.input_size)
    assert trained.shape == (int(64 * 1.15), int(96 * 1.15), 3)
    np.testing.assert_allclose(trained, cv2.resize(img, (int(96 * 1.15), int(64 * 1.15)),
                                                   interpolation=cv2.INTER_AREA), atol=1)
    assert ModelConfig.from_dict({k: v for k, v in whole.to_dict().items() if k != "crop"}).crop == "none"


def test_views_of_a_photo_frame_the_box_its_centre_and_the_whole_photo(tmp_path):
    """ModelConfig.views: "box" is load_for_model's crop, "centre" its middle 80% per side, "photo"
    the whole photo; in the order asked, an image that two views share once (a catalog bbox or
    crop="none": photo and box). Unknown or repeated views are refused in words; run folders saved
    before views read back with the box alone."""
    import cv2

    from core.catalog import Record
    from core.errors import UserError
    from siamese.config import ModelConfig
    from siamese.embed import load_for_model, load_views

    img = np.full((240, 360, 3), 128, np.uint8)
    img[60:180, 90:270] = textured()[60:180, 90:270]
    path = tmp_path / "p.png"
    cv2.imwrite(str(path), img)
    rec = Record(image="p.png", path=path, individual_id="a")
    cfg = ModelConfig(input_size=(64, 96), views=("photo", "box", "centre"))
    photo, box, centre = load_views(rec, cfg)
    assert photo.shape == (240, 360, 3)
    np.testing.assert_array_equal(box, load_for_model(rec, cfg))
    assert box.shape[0] * box.shape[1] < 0.7 * 240 * 360
    h, w = box.shape[:2]
    dy, dx = round(0.1 * h), round(0.1 * w)
    np.testing.assert_array_equal(centre, box[dy:h - dy, dx:w - dx])
    # with a catalog bbox the photo is the box: that image counts once
    given = Record(image="p.png", path=path, individual_id="a", bbox=(10, 20, 100, 50))
    photo, centre = load_views(given, cfg)
    assert photo.shape == (50, 100, 3) and centre.shape == (40, 80, 3)
    assert len(load_views(rec, replace(cfg, crop="none"))) == 2
    for bad, says in ((("box", "box"), "box given twice"), (("box", "side"), "'side' is no view"),
                      ((), "nothing is no view"), ("box", "a sequence")):
        with pytest.raises(UserError, match=says):
            ModelConfig(views=bad)
    assert ModelConfig().views == ("box", "centre", "photo")  # the default
    assert ModelConfig(views=["box", "photo"]).views == ("box", "photo")  # a list becomes a tuple
    saved_before = {k: v for k, v in cfg.to_dict().items() if k != "views"}
    assert ModelConfig.from_dict(saved_before).views == ("box",)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as config.json keeps it
