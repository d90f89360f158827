"""Plumbing of the optional model paths with tiny models built here (the real BiSeNet, SCRFD and ArcFace /
CurricularFace weights cannot be fetched offline): face-parsing models, five-point alignment, the insightface
ONNX backend. The ONNX tests need `onnx` and `onnxruntime` and skip without them."""

import numpy as np
import pytest
import skimage.data
import torch

from standin.faces import FaceModelError, get_backend
from standin.faces.align import ARCFACE_TEMPLATE_112, align_face, similarity_transform
from standin.faces.base import Face
from standin.faces.onnx_backend import decode_scrfd, nms
from standin.preprocess import ParsingModel, preprocess_reference


class RedIsPerson(torch.nn.Module):
    """A stand-in parser: class 1 (person) where the red channel is above half, else class 0 (background).
    Returns a tuple like BiSeNet (main logits first)."""

    def forward(self, x):
        red = x[:, 0:1] * 0.229 + 0.485  # undo the ImageNet normalisation the parser input gets
        return torch.cat([0.5 - red, red - 0.5], 1), red


def half_red_image(size: int = 64) -> np.ndarray:
    image = np.full((size, size, 3), 40, np.uint8)
    image[:, : size // 2, 0] = 230
    return image


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_parsing_model(tmp_path):
    path = tmp_path / "parser.pt"
    torch.jit.script(RedIsPerson()).save(str(path))
    model = ParsingModel.load(path)
    mask = model.person_mask(half_red_image())
    assert mask.shape == (64, 64)
    assert mask[:, :30].all() and not mask[:, 34:].any()

    # in preprocessing: the coffee photo has no face, the parser still runs on the padded image (as published)
    result = preprocess_reference(skimage.data.coffee(), background=path, size=256)
    out = np.asarray(result.image)
    assert result.background == "parsing" and out.shape == (256, 256, 3)
    assert (out[out[..., 0] < 100] == 255).all()  # nothing dark-red is left: it was painted white


def test_onnx_parsing_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    # 1x1 conv computing the same two logits as RedIsPerson from the normalised red channel
    weight = np.zeros((2, 3, 1, 1), np.float32)
    weight[0, 0], weight[1, 0] = -0.229, 0.229
    bias = np.array([0.5 - 0.485, 0.485 - 0.5], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["logits"])],
        "parser",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 512, 512])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    path = tmp_path / "parser.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    mask = ParsingModel.load(path).person_mask(half_red_image(100))
    assert mask[:, :48].all() and not mask[:, 52:].any()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_bad_parsing_model_files(tmp_path):
    with pytest.raises(FaceModelError, match="no such file"):
        ParsingModel.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(FaceModelError, match="neither a TorchScript model nor a torch state dict"):
        ParsingModel.load(tmp_path / "junk.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FaceModelError, match="facexlib"):
        ParsingModel.load(tmp_path / "other.pth")
    pytest.importorskip("onnxruntime")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FaceModelError, match="not a loadable ONNX model"):
        ParsingModel.load(tmp_path / "junk.onnx")


def test_similarity_transform_recovers_a_known_warp():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = ARCFACE_TEMPLATE_112
    target = source @ rotation.T + shift
    matrix = similarity_transform(source, target)
    np.testing.assert_allclose(matrix[:, :2], rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


def test_align_face_puts_landmarks_on_the_template():
    image = np.zeros((300, 300, 3), np.uint8)
    landmarks = ARCFACE_TEMPLATE_112 * 2 + 40  # the template, twice as big, shifted
    for x, y in landmarks.astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255
    aligned = align_face(image, landmarks.astype(np.float32), 112)
    for x, y in ARCFACE_TEMPLATE_112.round().astype(int):
        assert aligned[y - 1 : y + 2, x - 1 : x + 2].max() > 100


def test_scrfd_decoding_and_nms():
    size = (64, 64)
    counts = [(64 // s) ** 2 * 2 for s in (8, 16, 32)]
    scores = [np.zeros((n, 1), np.float32) for n in counts]
    boxes = [np.ones((n, 4), np.float32) for n in counts]
    keypoints = [np.zeros((n, 10), np.float32) for n in counts]
    # stride 8 grid is 8x8 cells, 2 anchors each: anchor 2 * (row 3 * 8 + col 5) sits at (40, 24)
    scores[0][2 * (3 * 8 + 5)] = 0.9
    scores[0][2 * (3 * 8 + 5) + 1] = 0.8  # same place, second anchor: suppressed by NMS
    boxes[0][2 * (3 * 8 + 5)] = [1, 2, 3, 4]
    boxes[0][2 * (3 * 8 + 5) + 1] = [1, 2, 3, 3.5]
    decoded, kept_scores, points = decode_scrfd(scores + boxes + keypoints, size, 0.5, True)
    assert len(decoded) == 2
    np.testing.assert_allclose(decoded[0], [40 - 8, 24 - 16, 40 + 24, 24 + 32])
    np.testing.assert_allclose(points[0], [[40, 24]] * 5)
    assert nms(decoded, kept_scores, 0.4) == [0]


def _onnx_models(folder):
    """A tiny SCRFD-shaped detector (scores light up on bright cells) and a tiny 112x112 recogniser."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    nodes, outputs, weights = [], [], []
    heads = {"score": (2, 1), "bbox": (8, 4), "kps": (20, 10)}
    for kind, (channels, width) in heads.items():
        for stride in (8, 16, 32):
            name = f"{kind}{stride}"
            weight = np.zeros((channels, 3, 1, 1), np.float32)
            bias = np.zeros(channels, np.float32)
            if kind == "score":
                weight[:, 0] = 8.0  # normalised pixels are about +1 on white, -1 on black
            if kind == "bbox":
                bias[:] = 1.0  # every anchor proposes a box one stride out on each side
            if kind == "kps":  # eyes, nose, mouth corners around the anchor, for both anchors of a cell
                bias[:] = np.tile([-0.3, -0.2, 0.3, -0.2, 0.0, 0.1, -0.2, 0.4, 0.2, 0.4], 2)
            weights += [numpy_helper.from_array(weight, f"w_{name}"), numpy_helper.from_array(bias, f"b_{name}")]
            nodes += [
                helper.make_node(
                    "AveragePool", ["input"], [f"pool_{name}"], kernel_shape=[stride, stride], strides=[stride, stride]
                ),
                helper.make_node("Conv", [f"pool_{name}", f"w_{name}", f"b_{name}"], [f"conv_{name}"]),
                helper.make_node("Transpose", [f"conv_{name}"], [f"nhwc_{name}"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"nhwc_{name}", f"shape_{width}"], [f"flat_{name}"]),
            ]
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [f"flat_{name}"], [name]))
            else:
                nodes.append(helper.make_node("Identity", [f"flat_{name}"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    for width in (1, 4, 10):
        weights.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"shape_{width}"))
    detector = helper.make_graph(
        nodes, "scrfd", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 640, 640])], outputs, weights
    )
    onnx.save(helper.make_model(detector, opset_imports=[helper.make_opsetid("", 17)]), folder / "det_tiny.onnx")

    projection = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    recogniser = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "projection"], ["embedding"]),
        ],
        "recogniser",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["n", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(projection, "projection")],
    )
    onnx.save(helper.make_model(recogniser, opset_imports=[helper.make_opsetid("", 17)]), folder / "rec_tiny.onnx")


def test_insightface_folder_backend(tmp_path):
    _onnx_models(tmp_path)
    backend = get_backend(tmp_path)
    assert backend.name == "rec_tiny+det_tiny"
    # a 320x240 frame: letterboxed at scale 2 into the 640 input; a white square at x 100..164, y 60..124
    image = np.zeros((240, 320, 3), np.uint8)
    image[60:124, 100:164] = 255
    faces = backend.detect(image)
    assert faces
    for face in faces:
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        # SCRFD anchors sit on cell corners, so this toy model's boxes may shift by up to half a cell (16 px)
        assert 84 <= cx <= 180 and 44 <= cy <= 140 and face.score >= 0.5
        assert face.landmarks.shape == (5, 2)
    vector = backend.embed(image, faces[0])
    assert vector.shape == (8,) and vector.dtype == np.float32
    assert abs(np.linalg.norm(vector) - 1) < 1e-5


def test_recogniser_file_with_dlib_detection(tmp_path):
    _onnx_models(tmp_path)
    backend = get_backend(tmp_path / "rec_tiny.onnx")
    astronaut = skimage.data.astronaut()
    face = max(backend.detect(astronaut), key=lambda f: f.area)
    same = backend.embed(astronaut, face)
    np.testing.assert_allclose(backend.embed(astronaut, face), same)
    with pytest.raises(ValueError, match="five landmarks"):
        backend.embed(astronaut, Face(box=face.box))


def test_backend_names_and_paths_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown face backend"):
        get_backend("no-such-backend")
    with pytest.raises(FaceModelError, match="no such ONNX model file"):
        get_backend(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="not a face backend"):
        get_backend(42)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_parsing_model_pickle_with_code_is_refused_without_advising_to_run_it(tmp_path, capsys):
    import os
    import pickle

    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"conv.weight": _Payload()}, handle)
    with pytest.raises(FaceModelError, match="pickles that need code to load are refused") as caught:
        ParsingModel.load(tmp_path / "evil.pth")
    assert "weights_only" not in str(caught.value) and "must never run" not in capsys.readouterr().out
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(FaceModelError, match="named pipe"):
        ParsingModel.load(tmp_path / "pipe.pth")
