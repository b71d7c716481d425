"""Datasets (TFDS builders, the built-in synthetic set) and the tf.data input pipeline."""
