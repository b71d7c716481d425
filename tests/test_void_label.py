"""The void label is one constant, dunet_jax.data.IGNORE_LABEL, not a config key: every consumer
(label checks, label readers, W fitting, loss, metrics) treats exactly that value as void."""

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from dunet_jax import metrics, reconstruction, train
from dunet_jax.data import IGNORE_LABEL, examples, label_files
from helpers import REPO_ROOT


def test_the_void_label_cannot_be_configured():
  """VOC, SBD and Context all mark void with 255; a key that looked configurable is refused."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values)
  with pytest.raises(flags.UnrecognizedFlagError, match='config.data.ignore_label'):
    values(['prog', f'--config={REPO_ROOT / "configs" / "voc.py"}', '--config.data.ignore_label=0'])
  assert IGNORE_LABEL == 255


def test_every_consumer_treats_the_constant_as_void(tmp_path):
  num_classes = 3
  labels = np.zeros((1, 8, 8), np.uint8)
  labels[0, :, 4:] = 1
  labels[0, 4:, :4] = IGNORE_LABEL                      # one all-void 4 x 4 window
  labels[0, 0, 5] = labels[0, 6, 6] = IGNORE_LABEL
  labels[0, 7, 7] = 2
  valid = labels != IGNORE_LABEL

  assert examples.check_label(labels[0], num_classes, 'x.png').dtype == np.uint8
  with pytest.raises(examples.BadFileError, match=r'\[254\]'):
    examples.check_label(np.full((2, 2), IGNORE_LABEL - 1), num_classes, 'x.png')

  confusion = np.asarray(metrics.confusion_matrix(labels, np.zeros_like(labels), num_classes))
  assert confusion.sum() == valid.sum()

  logits = np.random.default_rng(0).standard_normal((1, 8, 8, num_classes)).astype(np.float32)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.mean(np.take_along_axis(log_softmax, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid])
  np.testing.assert_allclose(float(train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), expected,
                             rtol=1e-5)

  moments = reconstruction.accumulate_moments([labels], ratio=4, num_classes=num_classes)
  assert moments.num_windows == 3 and moments.trace() == valid.sum()

  Image.fromarray(labels[0, :5, :6], 'L').save(tmp_path / 'a.png')
  batch = next(label_files.label_batches(tmp_path, ['a'], ratio=4, batch_size=1))
  np.testing.assert_array_equal(batch['label'][0, :5, :6], labels[0, :5, :6])
  assert batch['label'].shape == (1, 8, 8) and np.all(batch['label'][0, 5:] == IGNORE_LABEL)
  assert np.all(batch['label'][0, :, 6:] == IGNORE_LABEL)
