"""Every Keras export format (keras_aim.export.export_model, `keras-aim
export --format`): each artifact runs in its own runtime and matches Keras.

Runtimes: onnxruntime (ONNX), OpenVINO (IR, with float32 inference: its
default on CPUs with bfloat16 units is bfloat16), the LiteRT interpreter
(`ai_edge_litert`), `torch.export.load` (PyTorch program). Each format is
written from every backend that can write it (JAX, TensorFlow, PyTorch
passes); the SavedModel has its own tests (test_export.py), except the
check of the folder it writes into, which is here with the other targets.
"""

import os
import re
from pathlib import Path

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


def image_data_folder(folder: Path) -> Path:
    """A folder an export must not write into: images, a class folder
    named like a version (`0/`) and one with a name."""
    for name in ("0", "dogs"):
        (folder / name).mkdir(parents=True)
        (folder / name / "a.jpg").write_bytes(b"jpeg")
    (folder / "labels.txt").write_text("cat\ndog\n")
    return folder


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_saved_model_into_a_folder_of_other_files_is_refused_before_any_work(
    tmp_path, monkeypatch, capsys
):
    """Only a new or empty folder, or one holding earlier exports (numbered
    folders with a saved_model.pb, and an export's hidden staging folders),
    receives a version; anything else is refused with its contents named,
    before the model is traced (or, from the command line, loaded), and
    nothing is written into it."""
    from keras_aim.export import saved_model as aim_export
    from tests.model_families import AIM_V1

    backbone = AIM_V1.backbone()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was exported")

    monkeypatch.setattr(aim_export, "write_saved_model", must_not_run)
    data = image_data_folder(tmp_path / "images")
    before = tree(data)
    refusal = (
        rf"export_dir '{re.escape(str(data))}' holds other things than earlier exports: "
        r"'0/' \(numbered, but no saved_model.pb\), 'dogs/', 'labels.txt'\..*Choose an "
        r"empty or new folder.*or the folder of this model's earlier exports"
    )
    with pytest.raises(FileExistsError, match=refusal):
        aim_export.export_saved_model(backbone, data)
    with pytest.raises(FileExistsError, match=refusal):
        export_model(backbone, data, "saved_model", version=3)
    # The command line: refused before it reads --model (which does not exist).
    missing = str(tmp_path / "missing.keras")
    assert cli.main(["export", "--model", missing, "--out", str(data)]) == 1
    err = capsys.readouterr().err
    assert "holds other things than earlier exports: '0/'" in err and "missing.keras" not in err
    assert tree(data) == before
    # Earlier exports with a leftover staging folder of a killed export, and
    # one stray file: refused, naming only the file.
    served = tmp_path / "served"
    for name in ("1", "2"):
        (served / name / "variables").mkdir(parents=True)
        (served / name / "saved_model.pb").write_bytes(b"an earlier version")
    (served / ".3.tmp-k1ll3d").mkdir()
    (served / "notes.md").write_text("x")
    with pytest.raises(FileExistsError, match=r"exports: 'notes.md'\. "):
        aim_export.export_saved_model(backbone, served)
    (served / "notes.md").unlink()

    def write(model, path, **kwargs):
        Path(path, "saved_model.pb").write_bytes(b"version 3")

    monkeypatch.setattr(aim_export, "write_saved_model", write)
    assert aim_export.export_saved_model(backbone, served) == str(served / "3")
    assert (served / "3" / "saved_model.pb").read_bytes() == b"version 3"
    # An empty folder, and a new one.
    (tmp_path / "empty").mkdir()
    assert aim_export.export_saved_model(backbone, tmp_path / "empty").endswith(
        os.sep + "1")
    assert aim_export.export_saved_model(backbone, tmp_path / "new" / "aim").endswith(
        os.sep + "1")


@pytest.mark.slow
@each_family
def test_cli_exports_each_format_and_refuses_what_the_backend_cannot(family, tmp_path, capsys):
    model_file = str(tmp_path / "classifier.keras")
    classifier = family.classifier()
    classifier.save(model_file)
    out = str(tmp_path / f"exported{FORMATS[BACKBONE_FORMAT].suffix}")
    assert cli.main(["export", "--model", model_file, "--format", BACKBONE_FORMAT,
                     "--out", out]) == 0
    assert "input 'images'" in capsys.readouterr().out
    check_matches_keras(classifier, BACKBONE_FORMAT, out, family)
    assert cli.main(["export", "--model", model_file, "--format", BACKBONE_FORMAT,
                     "--out", out]) == 1
    assert "already exists" in capsys.readouterr().err
    for format in NOT_WRITABLE:
        path = str(tmp_path / f"other{FORMATS[format].suffix}")
        assert cli.main(["export", "--model", model_file, "--format", format,
                         "--out", path]) == 1
        assert "KERAS_BACKEND=" in capsys.readouterr().err
        assert not os.path.exists(path)


def test_the_lit_model_exports_as_saved_model_only(tmp_path, capsys):
    from tests import aimv2_tiny

    path = tmp_path / "lit.onnx"
    with pytest.raises(ValueError, match="saved_model only.*lit.vision_encoder"):
        export_model(aimv2_tiny.lit_model(load=False), path, "onnx")
    # The command line refuses before downloading the release.
    assert cli.main(["export", "--preset", "aimv2_large_patch14_224_lit",
                     "--format", "onnx", "--out", str(path)]) == 1
    assert "saved_model only" in capsys.readouterr().err
    assert not path.exists()
