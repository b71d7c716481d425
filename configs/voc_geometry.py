"""VOC-shaped data on the 12,031 real VOC / SBD label maps (dunet_jax/data/voc_geometry.py).

`python -m dunet_jax.main --config=configs/voc_geometry.py[:PRESETS] --workdir=RUN` paints one
JPEG per real label map (../shared/data/voc2012_labels) into the official VOC and SBD archives,
builds them with the real voc_segmentation builder (train_aug 10,582, val 1,449) and trains a small
CPU-sized DUNet on train_aug, evaluating on val at original size.

PRESETS, comma-separated, any of:
  os16 | os32 | os16_bilinear | os32_bilinear   output stride and decoder (default os16, DUpsample)
  maps=N                                        about N of the real maps (default: all)
  test                                          seconds-long variant: 24 maps, tiny net, 4 steps
The generated archives and the built dataset go to /tmp/dunet_jax_data/voc_geometry[_N]/.
"""
import ml_collections
from etils import epath

from configs import default

LABELS_DIR = epath.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'voc2012_labels'
TEST_MAPS = 24


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  presets = [part for part in (arg or '').split(',') if part]
  maps = TEST_MAPS if 'test' in presets else 0
  output_stride, decoder = 16, 'dupsample'
  for preset in presets:
    if preset.startswith('maps='):
      maps = int(preset[len('maps='):])
    elif preset in ('os16', 'os32', 'os16_bilinear', 'os32_bilinear'):
      output_stride, decoder = int(preset[2:4]), 'bilinear' if preset.endswith('_bilinear') else 'dupsample'
    elif preset != 'test':
      raise ValueError(f'Unknown preset {preset!r} for configs/voc_geometry.py: use os16, os32, '
                       'os16_bilinear, os32_bilinear, maps=N or test (comma-separated).')

  data = config.data
  root = f'/tmp/dunet_jax_data/voc_geometry{f"_{maps}" if maps else ""}'
  data.dataset = 'voc_segmentation'
  data.builder_config = 'voc2012'
  # Keys of this config only (dunet_jax.data.datasets.prepare paints the archives when they are set).
  data.geometry_labels_dir = str(LABELS_DIR)  # the real label maps
  data.geometry_maps = maps                   # about this many of them (0 = all 12,031)
  data.geometry_seed = 0                      # the painting is a pure function of this seed
  data.manual_dir = f'{root}/manual'
  data.tfds_data_dir = f'{root}/tfds'
  data.train_split = 'train_aug'
  data.eval_split = 'val'
  data.crop_size = 256
  data.min_scale = 0.5
  data.max_scale = 1.5
  data.eval_pad_size = 512          # VOC's longer side is at most 500

  model = config.model
  model.depth = 0
  model.stage_blocks = (1, 1, 3, 1)
  model.base_width = 16
  model.stem = 'deep'
  model.output_stride = output_stride
  model.decoder = decoder
  model.aspp = False
  model.fuse_features = ()
  model.decoder_convs = 2
  model.decoder_channels = 128
  model.num_components = 64 if output_stride == 16 else 128  # README: upper bound ~98.5-99.7 mIoU
  model.compute_dtype = 'float32'   # the README's full-scale figures were measured in float32
  model.temperature_init = 0.1

  train = config.train
  train.optimizer = 'adamw'
  train.batch_size = 8
  train.num_steps = 3000
  train.learning_rate = 0.004
  train.log_every = 50
  train.eval_every = 1000
  train.checkpoint_every = 500
  config.eval.batch_size = 8

  if 'test' in presets:
    data.crop_size = 64
    model.stage_blocks = (1, 1, 1, 1)
    model.base_width = 8
    model.decoder_channels = 16
    model.num_components = 16
    train.batch_size = 4
    train.num_steps = 4
    train.log_every = 2
    train.eval_every = 4
    train.checkpoint_every = 4
    config.eval.batch_size = 4
  return config
