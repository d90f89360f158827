"""Reference preprocessing on real photos (scikit-image's astronaut, cameraman, coffee, cat; matplotlib's
Grace Hopper) with the offline dlib backend, plus the crop geometry on arrays whose answer is known."""

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from standin.cli import main
from standin.preprocess import preprocess_reference
from standin.preprocess.crop import face_crop, pad_to_square, touches_all_borders

# Eileen Collins' face in skimage.data.astronaut(), as the dlib backend's whole-face box reports it
ASTRONAUT_FACE = (179, 51, 272, 178)


def grace_hopper() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    return np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut_result():
    return preprocess_reference(skimage.data.astronaut())


def test_astronaut_is_cropped_around_her_face(astronaut_result):
    result = astronaut_result
    assert result.image.size == (512, 512) and result.image.mode == "RGB"
    assert result.num_faces == 1 and result.fallback_reason is None
    # the only real face; the round mission badge on the suit must not count as one
    np.testing.assert_allclose(result.face.box, ASTRONAUT_FACE, atol=8)
    assert result.face.landmarks.shape == (5, 2)
    assert "the only face" in result.describe()


def test_background_is_painted_white_and_the_person_kept(astronaut_result):
    out = np.asarray(astronaut_result.image).astype(int)
    kept = np.asarray(preprocess_reference(skimage.data.astronaut(), background="keep").image).astype(int)
    # top corners are the studio backdrop: grey-beige in the crop, white after background removal
    for corner in (np.s_[:40, :40], np.s_[:40, -40:]):
        assert kept[corner].mean() < 235
        assert (out[corner] == 255).all(axis=-1).mean() > 0.95
    # face (skin), hair above it and the dark suit collar below are kept untouched
    for region in (np.s_[230:300, 200:310], np.s_[60:110, 200:310], np.s_[470:, 230:280]):
        np.testing.assert_array_equal(out[region], kept[region])
    assert (out[470:, 230:280] < 100).all(axis=-1).mean() > 0.9  # the collar is dark, not painted white


def test_several_faces_chooses_the_largest():
    astronaut, grace = skimage.data.astronaut(), grace_hopper()
    canvas = np.full((600, 900, 3), 255, np.uint8)
    canvas[:512, :512] = astronaut
    canvas[100:400, 600:856] = np.asarray(Image.fromarray(grace).resize((256, 300), Image.Resampling.LANCZOS))
    result = preprocess_reference(canvas, backend="dlib-hog")
    assert result.num_faces == 2
    np.testing.assert_allclose(result.face.box, ASTRONAUT_FACE, atol=8)
    assert "largest of 2 faces" in result.describe()


def test_no_face_pads_the_whole_image_and_says_so():
    coffee = skimage.data.coffee()  # 400 x 600, no face
    result = preprocess_reference(coffee)
    assert result.face is None and result.num_faces == 0
    assert result.fallback_reason == "no face found"
    assert result.background == "kept"  # GrabCut has no face to seed it: the image stays as it is
    out = np.asarray(result.image).astype(int)
    # 100 px of white above and below the 600-wide image become 85 px at 512
    assert (out[:80] == 255).all() and (out[-80:] == 255).all()
    expected = np.asarray(Image.fromarray(pad_to_square(coffee).image).resize((512, 512), Image.Resampling.BOX))
    assert np.abs(out[90:420] - expected[90:420].astype(int)).mean() < 3


def test_a_photo_that_is_already_a_face_crop_is_padded_whole():
    tight = skimage.data.astronaut()[45:185, 170:280]
    result = preprocess_reference(tight)
    assert result.face is None and result.num_faces == 1
    assert "touches all four borders" in result.fallback_reason


def test_other_people_photos_are_cropped_on_their_face():
    grace = preprocess_reference(grace_hopper(), backend="dlib-hog")
    x0, y0, x1, y1 = grace.face.box
    assert 150 < (x0 + x1) / 2 < 300 and 150 < (y0 + y1) / 2 < 300
    # the cameraman's face is turned away: HOG misses it, the default falls back to dlib's CNN detector
    camera = preprocess_reference(skimage.data.camera())
    assert camera.face is not None
    x0, y0, x1, y1 = camera.face.box
    assert 180 < (x0 + x1) / 2 < 270 and 100 < (y0 + y1) / 2 < 200


def test_huge_and_tiny_images():
    astronaut = skimage.data.astronaut()
    huge = np.asarray(Image.fromarray(astronaut).resize((3000, 3000), Image.Resampling.BILINEAR))
    result = preprocess_reference(huge, backend="dlib-hog")
    np.testing.assert_allclose(np.array(result.face.box) / (3000 / 512), ASTRONAUT_FACE, atol=10)
    tiny = preprocess_reference(np.full((5, 8, 3), 90, np.uint8))
    assert tiny.image.size == (512, 512) and tiny.fallback_reason == "no face found"


def test_face_crop_geometry():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :, 0] = np.arange(200)[None, :]  # red = x, so we can see where pixels went
    image[:, :, 1] = np.arange(100)[:, None]  # green = y
    # box 40 wide, 20 tall, centre (100, 50): side 60, window x 70..130, y 20..80, all inside
    crop = face_crop(image, (80, 40, 120, 60))
    assert crop.image.shape == (60, 60, 3)
    assert crop.image[0, 0, 0] == 70 and crop.image[0, 0, 1] == 20
    assert crop.map_box((80, 40, 120, 60)) == (10, 20, 50, 40)
    # centre (10, 10), side 60: clipped to x 0..40, y 0..40, then padded to 40x40 (already square)
    clipped = face_crop(image, (0, 0, 20, 20), scale=3.0)
    assert clipped.image.shape == (40, 40, 3) and clipped.image[0, 0, 0] == 0
    # a window clipped on one side only is padded with white to a square, centred like the published code
    edge = face_crop(image, (170, 40, 200, 60), scale=2.0)  # window x 155..215 -> 155..200 (45 wide), y 20..80
    assert edge.image.shape == (60, 60, 3)
    assert edge.content == (7, 0, 52, 60)
    assert (edge.image[:, :7] == 255).all() and (edge.image[:, 52:] == 255).all()
    assert edge.image[0, 7, 0] == 155


def test_pad_to_square_and_border_rule():
    padded = pad_to_square(np.zeros((10, 4, 3), np.uint8))
    assert padded.image.shape == (10, 10, 3) and padded.content == (3, 0, 7, 10)
    assert (padded.image[:, :3] == 255).all() and (padded.image[:, 3:7] == 0).all()
    assert touches_all_borders((5, 5, 95, 95), 100, 100, tolerance=10)
    assert not touches_all_borders((5, 5, 95, 80), 100, 100, tolerance=10)


def test_cli_writes_the_crop(tmp_path, capsys):
    source = tmp_path / "astronaut.jpg"
    Image.fromarray(skimage.data.astronaut()).save(source, quality=95)
    out = tmp_path / "refs" / "astronaut_ref.png"
    assert main(["preprocess", str(source), "-o", str(out), "--backend", "dlib-hog"]) == 0
    assert "the only face" in capsys.readouterr().out
    with Image.open(out) as written:
        assert written.size == (512, 512) and written.mode == "RGB"
    assert sorted(p.name for p in out.parent.iterdir()) == ["astronaut_ref.png"]  # no temporary file left


def test_cli_reports_the_fallback_as_json(tmp_path, capsys):
    import json

    source = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(source)
    out = tmp_path / "cat_ref.png"
    assert main(["preprocess", str(source), "-o", str(out), "--json", "--size", "256"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fallback_reason"] == "no face found" and report["face_box"] is None
    with Image.open(out) as written:
        assert written.size == (256, 256)


def test_preprocessing_is_deterministic():
    """GrabCut seeds its k-means from OpenCV's global RNG; the same photo must always give the same reference
    (without a fixed seed, two of three repeats differed here at 512 px)."""
    photo = skimage.data.astronaut()
    first = np.asarray(preprocess_reference(photo).image)
    for _ in range(2):
        cv2.randu(np.zeros((4, 4)), 0, 1)  # move OpenCV's global RNG on, as any other OpenCV user might
        assert np.array_equal(first, np.asarray(preprocess_reference(photo).image))
