"""The export formats and the backends that write them (no Keras import:
the command line lists them before any framework loads).

| format | writes | from backends | run it with |
|---|---|---|---|
| `saved_model` | TF Serving version folder (`saved_model.py`) | JAX, TensorFlow, PyTorch | TensorFlow / TF Serving |
| `onnx` | `.onnx` | JAX, TensorFlow, PyTorch | onnxruntime |
| `openvino` | `.xml` + `.bin` (OpenVINO IR) | JAX, TensorFlow, PyTorch | OpenVINO |
| `litert` | `.tflite` | TensorFlow | LiteRT (`ai_edge_litert`) |
| `torch` | `.pt2` (`torch.export` program) | PyTorch | `torch.export.load` |

The writers are in `keras_aim.export.exporters`.
"""

from __future__ import annotations

import dataclasses

BACKEND_NAMES = {"jax": "JAX", "tensorflow": "TensorFlow", "torch": "PyTorch"}


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format: its file suffix (`None`: a folder) and the Keras
    backends that can write it."""

    name: str
    suffix: str | None
    backends: tuple[str, ...]
    description: str


FORMATS = {
    f.name: f
    for f in (
        ExportFormat(
            "saved_model", None, ("jax", "tensorflow", "torch"),
            "TensorFlow SavedModel for TF Serving (a version folder)",
        ),
        ExportFormat("onnx", ".onnx", ("jax", "tensorflow", "torch"), "ONNX model"),
        ExportFormat(
            "openvino", ".xml", ("jax", "tensorflow", "torch"),
            "OpenVINO IR (.xml, with its weights in the .bin beside it)",
        ),
        ExportFormat("litert", ".tflite", ("tensorflow",), "LiteRT (TFLite) flatbuffer"),
        ExportFormat("torch", ".pt2", ("torch",), "torch.export program"),
    )
}


def get_format(name: str) -> ExportFormat:
    """The `ExportFormat` called `name`, or a `ValueError` listing them."""
    if name not in FORMATS:
        raise ValueError(
            f"Unknown export format {name!r}; choose one of: {', '.join(FORMATS)}."
        )
    return FORMATS[name]


def check_backend(spec: ExportFormat, backend: str | None = None) -> None:
    """Raises a `ValueError` naming the backends that can write `spec`
    unless `backend` (default: the active one) is one of them."""
    if backend is None:
        import keras

        backend = keras.config.backend()
    if backend in spec.backends:
        return
    able = " or ".join(BACKEND_NAMES.get(b, b) for b in spec.backends)
    hint = " or ".join(f"KERAS_BACKEND={b}" for b in spec.backends)
    raise ValueError(
        f"The {spec.name} format is written from the {able} backend; the "
        f"active backend is {BACKEND_NAMES.get(backend, backend)}. Run the "
        f"export with {hint} (a model saved with model.save() or "
        "save_to_preset() loads on any backend)."
    )
