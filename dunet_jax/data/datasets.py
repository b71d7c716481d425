"""One entry point from `config.data` to a prepared TFDS builder, and the class names it labels.

Training, evaluation and W fitting all call `prepare`, so the built-in data is generated and any
dataset is built on first use, and a missing download fails early with one message that says what
to put where. Nothing is ever downloaded.
"""
import importlib
import os

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from dunet_jax import storage
from dunet_jax.data import palette, synthetic, voc_geometry

BUILDER_MODULES = {
    'voc_segmentation': 'dunet_jax.data.voc',
    'pascal_context': 'dunet_jax.data.pascal_context',
}
SYNTHETIC_DATASET = 'voc_segmentation'
SYNTHETIC_BUILDER_CONFIG = 'synthetic'


def _builder_module(data_config: ml_collections.ConfigDict):
  if data_config.dataset not in BUILDER_MODULES:
    raise ValueError(f'config.data.dataset={data_config.dataset!r} is unknown: use one of '
                     f'{sorted(BUILDER_MODULES)}')
  return importlib.import_module(BUILDER_MODULES[data_config.dataset])


def builder_name(data_config: ml_collections.ConfigDict) -> str:
  """'dataset/config' as TFDS names it; synthetic data uses voc_segmentation's 'synthetic' config."""
  if data_config.synthetic:
    if data_config.dataset != SYNTHETIC_DATASET:
      raise ValueError(f'config.data.synthetic=True needs config.data.dataset={SYNTHETIC_DATASET!r}, '
                       f'got {data_config.dataset!r}')
    return f'{SYNTHETIC_DATASET}/{data_config.builder_config or SYNTHETIC_BUILDER_CONFIG}'
  if data_config.builder_config:
    return f'{data_config.dataset}/{data_config.builder_config}'
  return data_config.dataset


def data_dir(data_config: ml_collections.ConfigDict) -> epath.Path:
  """Where TFDS writes prepared datasets."""
  return storage.path(data_config.tfds_data_dir or tfds.core.constants.DATA_DIR)


def manual_dir(data_config: ml_collections.ConfigDict) -> epath.Path:
  """config.data.manual_dir, else TFDS's default <data_dir>/downloads/manual[/synthetic]."""
  if data_config.manual_dir:
    return storage.path(data_config.manual_dir)
  default = data_dir(data_config) / 'downloads' / 'manual'
  return default / 'synthetic' if data_config.synthetic else default


def check_manual_dir(data_config: ml_collections.ConfigDict) -> epath.Path:
  """The manual_dir of a real dataset; a clear error when it is missing or empty."""
  path = manual_dir(data_config)
  if not path.is_dir() or not any(path.iterdir()):
    state = 'does not exist' if not path.exists() else 'is empty'
    instructions = _builder_module(data_config).MANUAL_DOWNLOAD_INSTRUCTIONS
    raise FileNotFoundError(
        f'Dataset {data_config.dataset!r}: manual_dir {path} {state}.{instructions}'
        f'Then pass that folder as --config.data.manual_dir=FOLDER to training, or build first with\n'
        '  python -m dunet_jax.data.prepare --config=CONFIG --config.data.manual_dir=FOLDER\n'
        'Nothing is downloaded automatically.')
  return path


def _check_splits(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict) -> None:
  for key in ('train_split', 'eval_split'):
    split = data_config[key].split('[')[0]
    if split not in builder.info.splits:
      hint = ''
      if data_config.synthetic:
        hint = f' The built-in data has train, val and trainval: set --config.data.{key}=train or val.'
      elif split == 'train_aug':
        hint = (' train_aug needs SBD (benchmark.tgz or its extracted benchmark_RELEASE/dataset): add it to '
                f'the manual_dir and delete {builder.data_dir} to rebuild.')
      raise ValueError(f'config.data.{key}={data_config[key]!r}: {builder.name} built at {builder.data_dir} '
                       f'has splits {sorted(builder.info.splits)}.{hint}')


def _synthetic_is_stale(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict) -> bool:
  if not builder.is_prepared():
    return False
  splits = builder.info.splits
  return (splits['train'].num_examples != data_config.synthetic_num_train
          or splits['val'].num_examples != data_config.synthetic_num_val)


def prepare(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """A builder whose data is on disk: generates the synthetic files first when asked to."""
  tf.config.set_visible_devices([], 'GPU')
  _builder_module(data_config)  # registers the builder with TFDS
  builder = tfds.builder(builder_name(data_config), data_dir=str(data_dir(data_config)),
                         skip_bad_files=data_config.skip_bad_files)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if data_config.synthetic:
    path = manual_dir(data_config)
    settings = (data_config.synthetic_num_train, data_config.synthetic_num_val, data_config.synthetic_seed)
    if not synthetic.is_generated(path, *settings):
      synthetic.generate(path, *settings)
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    elif _synthetic_is_stale(builder, data_config):
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  elif data_config.get('geometry_labels_dir'):  # keys only configs/voc_geometry.py sets
    path = manual_dir(data_config)
    settings = dict(maps=data_config.geometry_maps, seed=data_config.geometry_seed)
    if not voc_geometry.is_generated(path, **settings):
      voc_geometry.generate(data_config.geometry_labels_dir, path,
                            workers=len(os.sched_getaffinity(0)), **settings)
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  elif builder.is_prepared():
    path = manual_dir(data_config)
  else:
    path = check_manual_dir(data_config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(path), download_mode=mode, try_download_gcs=False))
  _check_splits(builder, data_config)
  num_classes = len(class_names(data_config))
  if data_config.num_classes != num_classes:
    raise ValueError(f'config.data.num_classes={data_config.num_classes}, but {builder.name} labels '
                     f'{num_classes} classes here: set --config.data.num_classes={num_classes}')
  return builder


def label_lookup(data_config: ml_collections.ConfigDict) -> np.ndarray | None:
  """A 256-entry uint8 table the pipeline applies to stored labels, or None to keep them.

  Only PASCAL Context with config.data.context_classes=59 needs one (background -> 255).
  """
  if data_config.dataset == 'pascal_context' and not data_config.synthetic:
    if data_config.context_classes not in (59, 60):
      raise ValueError(f'config.data.context_classes={data_config.context_classes}: use 59 or 60')
    if data_config.context_classes == 59:
      return importlib.import_module(BUILDER_MODULES['pascal_context']).context_59_lookup()
  return None


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the classes as the pipeline labels them (index = class id)."""
  if data_config.synthetic:
    return synthetic.CLASS_NAMES
  if data_config.dataset == 'pascal_context':
    return palette.CONTEXT_59_CLASS_NAMES if data_config.context_classes == 59 else palette.CONTEXT_60_CLASS_NAMES
  _builder_module(data_config)
  return palette.VOC_CLASS_NAMES
