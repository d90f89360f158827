"""Every kind of reference input: EXIF orientation, modes and bit depths, and bad files that must fail clearly
without writing anything."""

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from standin.cli import main
from standin.io import save_image
from standin.preprocess import ImageLoadError, load_image, preprocess_reference


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


def test_exif_orientation_is_applied(tmp_path, astronaut):
    # stored rotated on its side, with the EXIF tag that tells viewers to turn it upright (6 = rotate 90 CW)
    stored = Image.fromarray(astronaut).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = np.asarray(load_image(path)).astype(int)
    assert upright.shape == astronaut.shape
    assert np.abs(upright - astronaut).mean() < 4
    face = preprocess_reference(path, backend="dlib-hog").face
    np.testing.assert_allclose(face.box, (179, 51, 272, 178), atol=8)


def test_grayscale_palette_and_cmyk(tmp_path, astronaut):
    gray = Image.fromarray(astronaut).convert("L")
    gray.save(tmp_path / "gray.png")
    loaded = np.asarray(load_image(tmp_path / "gray.png"))
    assert loaded.shape == (512, 512, 3) and (loaded[..., 0] == loaded[..., 2]).all()
    assert preprocess_reference(tmp_path / "gray.png", backend="dlib-hog").face is not None

    Image.fromarray(astronaut).quantize(256).save(tmp_path / "palette.gif")
    assert np.abs(np.asarray(load_image(tmp_path / "palette.gif")).astype(int) - astronaut).mean() < 6

    Image.fromarray(astronaut).convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    cmyk = np.asarray(load_image(tmp_path / "print.jpg")).astype(int)
    assert np.abs(cmyk - astronaut).mean() < 6


def test_transparency_becomes_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[5:15, 5:15, 3] = 255  # opaque red square on a fully transparent background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    loaded = np.asarray(load_image(tmp_path / "cutout.png"))
    assert (loaded[0, 0] == 255).all()
    assert tuple(loaded[10, 10]) == (200, 0, 0)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gray16 = np.full((8, 8), 32896, np.uint16)  # 32896 / 257 = 128
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert (np.asarray(load_image(tmp_path / "gray16.png")) == 128).all()

    cv2 = pytest.importorskip("cv2")
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 2] = 65535  # cv2 writes BGR: this is red
    rgb16[..., 1] = 32896
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16)
    assert tuple(np.asarray(load_image(tmp_path / "rgb16.png"))[0, 0]) == (255, 128, 0)


def test_arrays_of_every_usual_dtype():
    assert tuple(np.asarray(load_image(np.full((4, 4), 0.5, np.float32)))[0, 0]) == (128, 128, 128)
    assert tuple(np.asarray(load_image(np.full((4, 4, 3), 65535, np.uint16)))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(load_image(np.ones((4, 4, 1), bool)))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "notes.png", b"this is not a picture\n"), "not an image"),
        (lambda d: _write(d / "empty.jpg", b""), "not an image"),
        (lambda d: _write(d / "cut.png", _png_bytes()[:300]), "truncated or corrupt"),
        (lambda d: _write(d / "cut.jpg", _jpeg_bytes()[:2000]), "truncated or corrupt"),
    ],
    ids=["missing", "folder", "text", "empty", "truncated-png", "truncated-jpeg"],
)
def test_bad_files_raise_a_clear_error_and_write_nothing(tmp_path, capsys, make, message):
    source = make(tmp_path)
    with pytest.raises(ImageLoadError, match=message):
        load_image(source)
    out_dir = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    assert main(["preprocess", str(source), "-o", str(out_dir / "ref.png")]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert set(tmp_path.rglob("*")) == before  # no output, no temporary file, not even the output folder


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((4, 4, 2), np.uint8), "must be"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((4, 4), np.nan), "NaN"),
        (12, "expected a file path"),
    ],
    ids=["two-channels", "empty", "nan", "int"],
)
def test_bad_arrays_and_objects(value, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(value)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "ref.png"
    save_image(Image.new("RGB", (4, 4), (1, 2, 3)), target)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.png"]

    def broken_save(self, fp, format=None, **params):
        with open(fp, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (4, 4), (9, 9, 9)), target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ref.png"]
    assert np.asarray(Image.open(target))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown image extension"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "ref.txt")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG")
    return buffer.getvalue()
