"""Model families, one folder each, with files by role as in keras-hub:
`<family>_backbone.py`, `<family>_image_classifier.py`,
`<family>_image_converter.py`, `<family>_pretrainer.py`,
`<family>_presets.py` (the architecture table) and `convert_<family>.py`
(the released checkpoints' key names).

- `aim`: AIM-v1 (Apple, ICML 2024).
- `aimv2`: AIMv2 (Apple, CVPR 2025): vision encoders and the LiT model.
"""

from keras_aim.utils.lazy_imports import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {"aim": "keras_aim.models.aim", "aimv2": "keras_aim.models.aimv2"})
