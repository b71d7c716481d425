"""Shared test setup: 8 fake CPU devices (set before jax is used) and the real VOC labels."""
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
VOC_LABELS_DIR = REPO_ROOT.parent / 'shared' / 'data' / 'voc2012_labels'


@pytest.fixture(scope='session')
def voc_labels_dir() -> pathlib.Path:
  """Real VOC 2012 label maps (../shared/data/voc2012_labels); skips when absent."""
  if not (VOC_LABELS_DIR / 'SegmentationClass').is_dir():
    pytest.skip(f'real VOC labels not found at {VOC_LABELS_DIR}: tests that need them are skipped')
  return VOC_LABELS_DIR
