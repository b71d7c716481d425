"""Datasets (TFDS builders, the built-in synthetic set) and the tf.data input pipeline."""

# The void label of every dataset (VOC, SBD and PASCAL Context all mark void with 255) and of the
# padding the pipeline adds: never trained on, never scored, no part of W. Class ids must be below it.
# One constant rather than a config key, since the label files fix it.
IGNORE_LABEL = 255
