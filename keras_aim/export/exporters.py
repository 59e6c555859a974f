"""Every Keras export format, for backbones and classifiers, from one call.

    export_model(classifier, "aim.onnx", format="onnx")
    export_model(backbone, "serving/aim_trunk", format="saved_model")

Which format comes from which backend: `keras_aim.export.formats`.

`saved_model` keeps its serving signatures with the preprocessing inside
(see `keras_aim.export.saved_model`). The other formats hold the model
itself: one input, float32 images `(B, H, W, C)` already resized, cropped
and normalized (`AIMImageConverter`), any batch size; one output, the
model's own (a classifier's logits `(B, num_classes)`, a backbone's tokens
`(B, N, D)`).

Each format is written by Keras' `model.export` where that works for these
models, else by the format's own converter from the model:

- `onnx`: Keras (tf2onnx on TensorFlow, jax2onnx on JAX). On PyTorch, Keras
  traces models with a variable batch size with TorchScript, which cannot
  trace these models; here `torch.onnx.export`'s `torch.export`-based
  exporter writes it, with the batch size as a symbolic dimension.
- `openvino`: OpenVINO's converter reads the ONNX export. Keras' own
  OpenVINO export goes through jax2tf on JAX (which, with JAX 0.10, emits
  `XlaCallModule` ops that OpenVINO cannot convert) and through TorchScript
  on PyTorch; the ONNX route is the same on every backend.
- `litert`, `torch`: Keras. LiteRT from PyTorch would need the
  `litert-torch` package, which keras_aim does not install or test.

Every file is written beside its target under a hidden name and renamed in
when complete, companion files (OpenVINO's `.bin`, ONNX's external
weights) before their main file (`keras_aim.utils.atomic_files`): a failed
export leaves no partial file and an existing one untouched.
"""

from __future__ import annotations

import os
import tempfile

import keras

from keras_aim.export.formats import FORMATS, ExportFormat, check_backend, get_format
from keras_aim.export.saved_model import (
    check_exportable,
    export_saved_model,
    serving_converter,
)
from keras_aim.utils.atomic_files import atomic_file, atomic_file_with_companions

INPUT_NAME = "images"


def export_model(
    model: keras.Model,
    path: str | os.PathLike,
    format: str = "saved_model",
    *,
    image_size: int | None = None,
    overwrite: bool = False,
    version: int | None = None,
    top_k: int = 5,
) -> str:
    """Exports `model` (a backbone or an image classifier) in `format`;
    returns the path written.

    Args:
        model: an `AIMImageClassifier`, `AIMBackbone` or `AIMv2Backbone`
            (any keras-hub image classifier or image backbone with an
            `image_shape`); for `saved_model` also an `AIMv2LiT`.
        path: `saved_model`: TF Serving's model base path (the version
            folder goes inside); other formats: the file to write, ending in
            the format's suffix (`.onnx`, `.xml`, `.tflite`, `.pt2`).
        format: one of `FORMATS`.
        image_size: crop side for trunks built for any image size (default
            224); otherwise the model's own size.
        overwrite: replace an existing file or version (else
            `FileExistsError`).
        version, top_k: `saved_model` only (see `export_saved_model`).

    Raises:
        ValueError: an unknown format, a path without the format's suffix,
            or a format the active backend cannot write (the error names
            the backends that can).
    """
    spec = get_format(format)
    check_exportable(model, top_k, image_text=spec.name == "saved_model")
    check_backend(spec)
    if spec.name == "saved_model":
        return export_saved_model(
            model, path, version=version, overwrite=overwrite, top_k=top_k,
            image_size=image_size,
        )
    path = check_target(spec, path, overwrite)
    input_shape = export_input_shape(model, image_size)
    writer = {
        "onnx": write_onnx,
        "openvino": write_openvino,
        "litert": write_litert,
        "torch": write_torch,
    }[spec.name]
    writer(model, path, input_shape)
    return path


def check_target(spec: ExportFormat, path: str | os.PathLike, overwrite: bool) -> str:
    """`path` as a string, after checking its suffix and that it may be
    (over)written."""
    path = os.fspath(path)
    if not path.endswith(spec.suffix):
        raise ValueError(
            f"The {spec.name} format writes a {spec.suffix} file; received "
            f"path {path!r}. Name the file like 'model{spec.suffix}'."
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; pass a file path ending in {spec.suffix}.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path!r} already exists. Pass overwrite=True (keras-aim export "
            "--overwrite) to replace it, or another path."
        )
    return path


def export_input_shape(model: keras.Model, image_size: int | None = None) -> tuple:
    """`(None, height, width, channels)`: the exported input, with a
    variable batch size; height and width are the model's (or `image_size`
    for trunks built for any size)."""
    height, width = serving_converter(model, image_size).image_size
    backbone = getattr(model, "backbone", model)
    return (None, height, width, backbone.image_shape[-1])


def _input_spec(input_shape) -> keras.InputSpec:
    return keras.InputSpec(shape=input_shape, dtype="float32", name=INPUT_NAME)


def write_onnx(model: keras.Model, path: str, input_shape: tuple) -> None:
    """The model as an ONNX graph (opset of the exporter's choosing) with a
    symbolic batch size, written atomically to `path` (with its weights in
    `path + ".data"` beside it when they pass ONNX's 2 GB limit)."""
    with atomic_file_with_companions(path) as staging:
        if keras.config.backend() == "torch":
            _write_onnx_from_torch(model, staging, input_shape)
        else:
            try:
                model.export(
                    staging, format="onnx", input_signature=[_input_spec(input_shape)],
                    verbose=False,
                )
            except ValueError as error:
                if "GraphDef" not in str(error):
                    raise
                raise ValueError(
                    "ONNX export from the TensorFlow backend (tf2onnx) is limited "
                    "to graphs under 2 GB, and this model's float weights pass "
                    "that. Export it with KERAS_BACKEND=jax or KERAS_BACKEND=torch, "
                    "which write the weights beside the graph (.onnx.data)."
                ) from error


def _write_onnx_from_torch(model, path: str, input_shape: tuple) -> None:
    import torch

    # A batch of 2: torch.export fixes dimensions of size 1 to constants.
    example = torch.zeros((2, *input_shape[1:]), dtype=torch.float32)
    model.eval()
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=[({0: torch.export.Dim("batch")},)],  # forward(*args)
        input_names=[INPUT_NAME],
        verbose=False,
    )
    program.optimize()
    program.save(path)


def write_openvino(model: keras.Model, path: str, input_shape: tuple) -> None:
    """OpenVINO IR (`path`, an `.xml`, and its `.bin` beside it), converted
    by OpenVINO from the ONNX export; weights kept in float32."""
    import openvino

    with tempfile.TemporaryDirectory(prefix="keras_aim_openvino_") as scratch:
        onnx_path = os.path.join(scratch, "model.onnx")
        write_onnx(model, onnx_path, input_shape)
        converted = openvino.convert_model(onnx_path)
        # The .bin first: the .xml appears last, with its weights complete.
        with atomic_file_with_companions(path) as staged:
            openvino.save_model(converted, staged, compress_to_fp16=False)


def write_litert(model: keras.Model, path: str, input_shape: tuple) -> None:
    """A LiteRT (TFLite) flatbuffer with a variable batch size (Keras'
    converter, float32, no optimizations)."""
    with atomic_file(path) as staging:
        model.export(
            staging, format="litert", input_signature=[_input_spec(input_shape)],
            verbose=False,
        )


def write_torch(model: keras.Model, path: str, input_shape: tuple) -> None:
    """A `torch.export` program (`.pt2`) with a symbolic batch size."""
    import torch

    with atomic_file(path) as staging:
        model.export(
            staging, format="torch", input_signature=[_input_spec(input_shape)],
            dynamic_shapes={0: torch.export.Dim("batch")}, verbose=False,
        )


__all__ = ["FORMATS", "check_target", "export_input_shape", "export_model"]
