"""Input pipelines (tf.data; TensorFlow is imported here, not in the models).

- `embedded.digits()`: a small real image set that ships inside an installed
  package (scikit-learn's handwritten digits), no download.
- `images`: the one image-file decoding (`decode_image`, `read_image`) of
  the command line, image folders and the exported SavedModel.
- `pipelines`: training / evaluation streams with AIM's augmentation over
  random-access sources (`random_access`: arrays, listed image folders,
  record files, tfds splits); the order is a function of the position, so
  a resume starts in O(1) and each process reads only its share.
- `records`: `write_records`, an image folder or a tfds split as ArrayRecord
  files read by index (`keras-aim prepare-data`, `--data records:DIR`).
"""

from keras_aim.data.embedded import digits
from keras_aim.data.images import decode_image, read_image
from keras_aim.data.pipelines import (
    BadImages,
    classification_dataset,
    classification_stream,
    evaluation_batches,
    image_folder,
    pretraining_dataset,
    tfds_images,
)

__all__ = [
    "BadImages",
    "classification_dataset",
    "classification_stream",
    "decode_image",
    "digits",
    "evaluation_batches",
    "image_folder",
    "pretraining_dataset",
    "read_image",
    "tfds_images",
]
