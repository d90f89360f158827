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


def run_cli(*args):
    """The CLI in a child process: dlib's crashes (rc 134) must not take the test session down."""
    import subprocess
    import sys

    code = "import sys; from standin.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("width, height", [(20, 4000), (10, 4000), (4000, 20)])
def test_thin_strips_are_refused_before_face_detection(tmp_path, width, height):
    Image.new("RGB", (width, height), (128, 128, 128)).save(tmp_path / "strip.png")
    # the default backend: dlib's CNN detector crashed the process on these (double free, rc 134)
    done = run_cli("preprocess", str(tmp_path / "strip.png"), "-o", str(tmp_path / "out.png"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{width}x{height} px" in done.stderr and "at most 20:1" in done.stderr
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(ImageLoadError, match=f"{width}x{height} px"):
        load_image(np.zeros((height, width, 3), np.uint8))


def test_a_strip_within_the_limit_still_works():
    result = preprocess_reference(np.full((40, 800, 3), 200, np.uint8), backend="dlib-hog")  # 20:1
    assert result.image.size == (512, 512) and result.fallback_reason == "no face found"


def test_oversized_images_are_refused_from_the_header(tmp_path, monkeypatch):
    from standin.faces import base

    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(base, "MAX_IMAGE_SIDE", 256)  # a 300 px image stands in for a 20000 px one
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    with pytest.raises(ImageLoadError, match="300x200 px, larger than the limit of 256 px"):
        load_image(tmp_path / "big.png")
    assert not decoded  # refused before the pixels were decoded


def test_absurd_output_sizes_are_refused_before_any_work(tmp_path, capsys):
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "a.png")
    assert main(["preprocess", str(tmp_path / "a.png"), "-o", str(tmp_path / "out.png"), "--size", "200000"]) == 1
    assert "16 to 4096 pixels, got 200000" in capsys.readouterr().err
    with pytest.raises(ValueError, match="got 8"):
        preprocess_reference(tmp_path / "a.png", size=8)


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "photo.png")  # Image.open on it would wait for a writer forever
    with pytest.raises(ImageLoadError, match="named pipe"):
        load_image(tmp_path / "photo.png")


def test_the_dlib_backend_refuses_strips_itself():
    from standin.faces.dlib_backend import DlibBackend

    with pytest.raises(ValueError, match="4000x8 px"):
        DlibBackend("hog").detect(np.zeros((8, 4000, 3), np.uint8))
