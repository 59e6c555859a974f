"""Exporting models for serving: a SavedModel for TensorFlow Serving, from
any backend, with the evaluation preprocessing inside the graph.

    export_saved_model(model, "serving/aim", version=None)

See `keras_aim.export.saved_model`.
"""

from keras_aim.export.saved_model import (
    embedding_outputs,
    export_saved_model,
    keras2_layer,
    next_version,
    predict_rest_body,
    resolve_version,
    rest_request_body,
    serving_converter,
    serving_outputs,
    signature_names,
    write_saved_model,
)

__all__ = [
    "embedding_outputs",
    "export_saved_model",
    "keras2_layer",
    "next_version",
    "predict_rest_body",
    "resolve_version",
    "rest_request_body",
    "serving_converter",
    "serving_outputs",
    "signature_names",
    "write_saved_model",
]
