"""Input pipelines (tf.data; TensorFlow is imported here, not in the models).

- `embedded.digits()`: a small real image set that ships inside an installed
  package (scikit-learn's handwritten digits), no download.
- `images`: the one image-file decoding (`decode_image`, `read_image`) of
  the command line, image folders and the exported SavedModel.
- `pipelines`: training / evaluation datasets with AIM's augmentation from
  NumPy arrays, image folders or tensorflow-datasets names.
- `records`: `write_records`, an image folder or a tfds split as ArrayRecord
  files read by index (`keras-aim prepare-data`, `--data records:DIR`).
"""

from keras_aim.data.embedded import digits
from keras_aim.data.images import decode_image, read_image
from keras_aim.data.pipelines import (
    classification_dataset,
    image_folder,
    pretraining_dataset,
    tfds_images,
)

__all__ = [
    "classification_dataset",
    "decode_image",
    "digits",
    "image_folder",
    "pretraining_dataset",
    "read_image",
    "tfds_images",
]
