"""Every Keras export format (keras_aim.export.export_model, `keras-aim
export --format`): each artifact runs in its own runtime and matches Keras.

Runtimes: onnxruntime (ONNX), OpenVINO (IR, with float32 inference: its
default on CPUs with bfloat16 units is bfloat16), the LiteRT interpreter
(`ai_edge_litert`), `torch.export.load` (PyTorch program). Each format is
written from every backend that can write it (JAX, TensorFlow, PyTorch
passes); the SavedModel has its own tests (test_export.py).
"""

import os

import keras
import numpy as np
import pytest

from keras_aim import cli
from keras_aim.export import FORMATS, export_model
from tests.conftest import to_numpy
from tests.model_families import each_family

BACKEND = keras.config.backend()
WRITABLE = [n for n, f in FORMATS.items() if n != "saved_model" and BACKEND in f.backends]
NOT_WRITABLE = [n for n, f in FORMATS.items() if BACKEND not in f.backends]
# The format each pass writes for backbones (classifiers get every format).
BACKBONE_FORMAT = {"jax": "onnx", "tensorflow": "litert", "torch": "torch"}[BACKEND]
# All runtimes compute in float32 here (OpenVINO told to): Keras' tolerance.
ATOL = 1e-4


def run_artifact(format: str, path: str, images: np.ndarray) -> np.ndarray:
    """The artifact's output for `images`, computed by its own runtime."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    if format == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        return compiled(images)[0]
    if format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
        (spec,) = interpreter.get_input_details()
        interpreter.resize_tensor_input(spec["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(spec["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if format == "torch":
        import torch

        program = torch.export.load(path)
        return program.module()(torch.from_numpy(images)).detach().numpy()
    raise ValueError(format)


def check_matches_keras(model, format, path, family):
    # Two batch sizes: the batch axis of every artifact is variable.
    for images in (family.images(1, seed=3), family.images(3, seed=4)):
        got = run_artifact(format, path, images)
        expected = to_numpy(model(images))
        assert got.shape == expected.shape, format
        np.testing.assert_allclose(got, expected, atol=ATOL, err_msg=format)


@pytest.mark.slow
@each_family
@pytest.mark.parametrize("format", WRITABLE)
def test_classifier_artifact_matches_keras_in_its_runtime(family, format, tmp_path):
    classifier = family.classifier()
    path = str(tmp_path / f"classifier{FORMATS[format].suffix}")
    assert export_model(classifier, path, format) == path
    check_matches_keras(classifier, format, path, family)
    written = {"classifier.xml", "classifier.bin"} if format == "openvino" else {
        os.path.basename(path)
    }
    assert set(os.listdir(tmp_path)) == written  # and no staging files left


@pytest.mark.slow
@each_family
def test_backbone_artifact_matches_keras_in_its_runtime(family, tmp_path):
    backbone = family.backbone()
    path = str(tmp_path / f"backbone{FORMATS[BACKBONE_FORMAT].suffix}")
    export_model(backbone, path, BACKBONE_FORMAT)
    check_matches_keras(backbone, BACKBONE_FORMAT, path, family)


@each_family
@pytest.mark.parametrize("format", NOT_WRITABLE or ["none"])
def test_a_format_the_backend_cannot_write_names_the_backend_that_can(family, format, tmp_path):
    if format == "none":
        pytest.skip(f"{BACKEND} writes every format")
    able = {"torch": "PyTorch", "tensorflow": "TensorFlow"}
    names = [able[b] for b in FORMATS[format].backends]
    path = tmp_path / f"model{FORMATS[format].suffix}"
    with pytest.raises(ValueError, match=" or ".join(names) + " backend"):
        export_model(family.backbone(), path, format)
    assert not path.exists()


@each_family
def test_bad_paths_and_existing_files_are_refused_before_exporting(family, tmp_path):
    format = BACKBONE_FORMAT
    suffix = FORMATS[format].suffix
    with pytest.raises(ValueError, match=f"writes a {suffix} file"):
        export_model(family.backbone(), tmp_path / "model.bin", format)
    existing = tmp_path / f"model{suffix}"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(family.backbone(), existing, format)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="Unknown export format 'tflite'"):
        export_model(family.backbone(), existing, "tflite")


def test_a_failed_export_leaves_no_file(monkeypatch, tmp_path):
    from keras_aim.export import exporters
    from tests.model_families import AIM_V1

    def crash_midway(model, path, *args, **kwargs):
        for name in (path, path + ".data"):  # the graph and its external weights
            with open(name, "wb") as file:
                file.write(b"half a model")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", crash_midway)  # TensorFlow, JAX
    monkeypatch.setattr(exporters, "_write_onnx_from_torch", crash_midway)  # PyTorch
    for target in (tmp_path / "model.onnx", tmp_path / "model.xml"):
        with pytest.raises(RuntimeError, match="converter crashed"):
            export_model(AIM_V1.backbone(), target, target.suffix[1:].replace("xml", "openvino"))
        assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_exports_each_format_and_refuses_what_the_backend_cannot(tmp_path, capsys):
    from tests.model_families import AIM_V1

    model_file = str(tmp_path / "classifier.keras")
    classifier = AIM_V1.classifier()
    classifier.save(model_file)
    out = str(tmp_path / f"exported{FORMATS[BACKBONE_FORMAT].suffix}")
    assert cli.main(["export", "--model", model_file, "--format", BACKBONE_FORMAT,
                     "--out", out]) == 0
    assert "input 'images'" in capsys.readouterr().out
    check_matches_keras(classifier, BACKBONE_FORMAT, out, AIM_V1)
    assert cli.main(["export", "--model", model_file, "--format", BACKBONE_FORMAT,
                     "--out", out]) == 1
    assert "already exists" in capsys.readouterr().err
    for format in NOT_WRITABLE:
        path = str(tmp_path / f"other{FORMATS[format].suffix}")
        assert cli.main(["export", "--model", model_file, "--format", format,
                         "--out", path]) == 1
        assert "KERAS_BACKEND=" in capsys.readouterr().err
        assert not os.path.exists(path)
