"""Exporting models for serving, in every Keras export format, from any
backend:

    export_model(model, "aim.onnx", format="onnx")       # onnx, openvino, litert, torch
    export_saved_model(model, "serving/aim", version=None)  # TF Serving, preprocessing inside

See `keras_aim.export.formats` (which format from which backend) and
`keras_aim.export.saved_model`.
"""

from keras_aim.export.formats import (
    FORMATS,
    ExportFormat,
    check_backend,
    export_input_shape,
    export_model,
    get_format,
)
from keras_aim.export.saved_model import (
    export_saved_model,
    keras2_layer,
    next_version,
    predict_rest_body,
    resolve_version,
    rest_request_body,
    serving_converter,
    serving_outputs,
    write_saved_model,
)

__all__ = [
    "FORMATS",
    "ExportFormat",
    "check_backend",
    "export_input_shape",
    "export_model",
    "export_saved_model",
    "get_format",
    "keras2_layer",
    "next_version",
    "predict_rest_body",
    "resolve_version",
    "rest_request_body",
    "serving_converter",
    "serving_outputs",
    "write_saved_model",
]
