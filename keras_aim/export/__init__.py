"""Exporting models for serving, in every Keras export format, from any
backend:

    export_model(model, "aim.onnx", format="onnx")       # onnx, openvino, litert, torch
    export_saved_model(model, "serving/aim", version=None)  # TF Serving, preprocessing inside

`formats` lists the formats and the backends that write them (it imports no
framework); `exporters` writes them; `saved_model` is the TF Serving export,
`versions` its version folders and which folders it may write into.
Names are imported on first use, so the command line can list the formats
before Keras loads.
"""

from keras_aim.utils.lazy_imports import lazy_attributes

_FORMATS = "keras_aim.export.formats"
_EXPORTERS = "keras_aim.export.exporters"
_SAVED_MODEL = "keras_aim.export.saved_model"
_VERSIONS = "keras_aim.export.versions"
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "FORMATS": f"{_FORMATS}:FORMATS",
        "ExportFormat": f"{_FORMATS}:ExportFormat",
        "check_backend": f"{_FORMATS}:check_backend",
        "get_format": f"{_FORMATS}:get_format",
        "export_input_shape": f"{_EXPORTERS}:export_input_shape",
        "export_model": f"{_EXPORTERS}:export_model",
        **{
            name: f"{_VERSIONS}:{name}"
            for name in ("check_export_folder", "next_version", "resolve_version")
        },
        **{
            name: f"{_SAVED_MODEL}:{name}"
            for name in (
                "embedding_outputs",
                "export_saved_model",
                "keras2_layer",
                "predict_rest_body",
                "rest_request_body",
                "serving_converter",
                "serving_outputs",
                "signature_names",
                "write_saved_model",
            )
        },
    },
)
__all__ = __dir__()
