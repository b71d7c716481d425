"""PASCAL VOC 2012 (train_aug -> val) presets for the paper's networks.

`--config=configs/voc.py:PRESET` or `configs/voc.py:PRESET,tiny`. The tiny variant keeps every
layer name the preset fuses (so the same features exist) but shrinks widths, input size and
steps, and trains on the built-in synthetic data: it is what the CPU tests run.

Every preset trains from ImageNet weights and refuses to start without
`--config.model.pretrained=W.npz` (the message gives the convert_weights command for its backbone);
`--config.model.pretrained=none` trains from scratch on purpose. Xception presets normalise inputs
as timm's TF-ported weights expect (mean = std = 0.5, padding colour 128); ResNet presets use the
ImageNet mean / std of torchvision and timm's gluon weights.

Presets (R-50 / R-101 use the deep 'v1c' stem, which provides conv1_3; convert timm's
resnet50c / resnet101c weights, or use `--config.model.stem=standard` with torchvision's):
  r50_os16, r50_os32                  Table 1: DUpsample, no fusion
  r50_os16_bilinear, r50_os32_bilinear  Table 1: 1x1 conv + bilinear baseline
  r50_os16_<fusion>                   Table 2: fusion = conv1_3 | b1u2c3 | b3u6c3 |
                                      b1u2c3_b3u6c3 | conv1_3_b3u6c3
  r50_os16_deeplabv3plus_<fusion>     Table 3 vanilla decoder (b1u2c3 | conv1_3_b3u6c3)
  r101_os8_deeplabv3plus              DeepLabV3+ with ResNet-101 at output stride 8 (b1u2c3)
  x65_os16_deeplabv3plus              DeepLabV3+ with Xception-65 (efb2u1c2)
  x65_os16                            Xception-65, DUpsample fusing mfb1u16c3 (Table 3's best)
  x65_os16_<fusion>, x65_os16_deeplabv3plus_<fusion>   Table 3: efb2u1c2 | mfb1u16c3
  x71_os16                            Xception-71 (PASCAL Context's backbone), as x65_os16

Decoder widths (the paper does not state them; chosen so that XLA's FLOPs match Tables 2/3, see
benchmarks/flops_tables.py): ASPP of 256 on the backbone; each fused feature pooled down, 1x1
conv to 48, one 3x3 conv to 256; concatenated with ASPP's output; 1x1 conv to C'; DUpsample.
The vanilla decoder uses separable 3x3 convs of 256 as DeepLabV3+ does.

C' (model.num_components, not stated in the paper) per preset, from the FLOPs and the upper bound
(README, "Measured"):
  ResNet at r = 8 or 16: C' = 64. Table 2's FLOPs are reproduced with 64 (its 'none' row, 0.80 G,
    is ASPP 256 -> 1x1 to 64 -> DUpsample to 16*16*21); 128 would add 0.82 G to every row. The
    upper bound at r = 16 is 99.71 mIoU with 64 (99.91 with 128), far above what the net reaches.
  Xception: C' = 128. Table 3's proposed X-65 rows (1.93 / 1.98 G) are 0.78 / 0.75 G above the
    ResNet rows fusing as many channels; going from 64 to 128 adds (512 * 64 + 64 * 5,376)
    multiply-adds per stride-16 position = 0.82 GFLOPs at 513, which closes that gap (1.92 / 1.96).
  r = 32 (os32): C' = 128. The upper bound at r = 32 is 98.48 mIoU with 64 but 99.54 with 128:
    with 64, reconstructing ground truth alone loses 1.5 mIoU, more than the 1.0 that separates
    Table 1's DUpsample rows at OS32 and OS16; 128 loses 0.5.
"""
import re

import ml_collections

from configs import default
from configs import synthetic

FUSIONS = {
    'conv1_3': ('conv1_3',), 'b1u2c3': ('b1u2c3',), 'b3u6c3': ('b3u6c3',),
    'b1u2c3_b3u6c3': ('b1u2c3', 'b3u6c3'), 'conv1_3_b3u6c3': ('conv1_3', 'b3u6c3'),
    'efb2u1c2': ('efb2u1c2',), 'mfb1u16c3': ('mfb1u16c3',),
    'efb2u1c2_mfb1u16c3': ('efb2u1c2', 'mfb1u16c3'),
}
# The input convention of timm's TF-ported Xception weights (what convert_weights records for
# xception65 / xception71), and the padding colour that normalises to ~0 under it (127.5 -> 128).
TF_MEAN, TF_STD, TF_PAD_PIXEL = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (128, 128, 128)
BACKBONES = {'r50': ('resnet', 50), 'r101': ('resnet', 101), 'x65': ('xception', 65),
             'x71': ('xception', 71)}


def _parse(name: str) -> tuple[str, int, str, tuple[str, ...]]:
  """'r50_os16_deeplabv3plus_b1u2c3' -> ('r50', 16, 'deeplabv3plus', ('b1u2c3',))."""
  parts = name.split('_')
  if len(parts) < 2 or parts[0] not in BACKBONES or not parts[1].startswith('os'):
    raise ValueError(f'Unknown preset {name!r} for configs/voc.py: see the list in its docstring '
                     '(e.g. r50_os16, r50_os16_b1u2c3, x65_os16, r101_os8_deeplabv3plus)')
  backbone, output_stride, rest = parts[0], parts[1][2:], '_'.join(parts[2:])
  decoder = 'dupsample'
  for candidate in ('bilinear', 'deeplabv3plus'):
    if rest == candidate or rest.startswith(candidate + '_'):
      decoder, rest = candidate, rest[len(candidate) + 1:]
  xception = BACKBONES[backbone][0] == 'xception'
  if not rest:
    if decoder == 'bilinear' or (decoder == 'dupsample' and not xception):
      fusion = ()
    else:
      fusion = FUSIONS['mfb1u16c3' if xception and decoder == 'dupsample' else
                       'efb2u1c2' if xception else 'b1u2c3']
  elif rest in FUSIONS:
    fusion = FUSIONS[rest]
  else:
    raise ValueError(f'Unknown fusion {rest!r} in preset {name!r} for configs/voc.py: '
                     f'choose from {sorted(FUSIONS)}')
  if output_stride not in ('8', '16', '32'):
    raise ValueError(f'Preset {name!r}: the output stride must be os8, os16 or os32')
  return backbone, int(output_stride), decoder, fusion


def num_components(backbone: str, output_stride: int) -> int:
  """C' of a preset: 128 for Xception and at r = 32, else 64 (why: the module docstring)."""
  return 128 if BACKBONES[backbone][0] == 'xception' or output_stride == 32 else 64


def _units_needed(fuse_features: tuple[str, ...], prefix: str, num_stages: int) -> tuple[int, ...]:
  """Fewest units per stage that still provide every fused `<prefix><stage>u<unit>[c<conv>]` layer."""
  units = [1] * num_stages
  for name in fuse_features:
    match = re.fullmatch(prefix + r'(\d+)u(\d+)(c\d+)?', name)
    if match:
      stage = int(match[1]) - 1
      units[stage] = max(units[stage], int(match[2]))
  return tuple(units)


def _tiny(config: ml_collections.ConfigDict) -> None:
  """Seconds-long CPU variant on the built-in synthetic data. Each stage keeps only the units the
  preset fuses (one otherwise), so the fused layer names still exist; Xception's entry and exit
  flows keep their blocks."""
  data, model, train = config.data, config.model, config.train
  data.synthetic = True
  data.manual_dir = '/tmp/dunet_jax_data/synthetic_tiny/manual'
  data.tfds_data_dir = '/tmp/dunet_jax_data/synthetic_tiny/tfds'
  data.synthetic_num_train = 32
  data.synthetic_num_val = 16
  data.train_split = 'train'
  data.eval_split = 'val'
  data.crop_size = 64
  data.min_scale = 0.75
  data.max_scale = 1.5
  data.eval_pad_size = synthetic.eval_pad_size(model.output_stride)
  model.base_width = 8
  if model.backbone == 'resnet':
    model.stage_blocks = _units_needed(model.fuse_features, 'b', 4)
  else:
    model.stage_blocks = _units_needed(model.fuse_features, 'mfb', 1)
  model.depth = 0 if model.backbone == 'resnet' else model.depth
  model.aspp_channels = 16
  model.fuse_channels = 8
  model.decoder_channels = 16
  model.num_components = 16
  model.compute_dtype = 'float32'
  train.w_solver = 'randomized'  # N = r*r*21 = 5,376 at stride 16: several times faster than eigh, same subspace
  train.batch_size = 8
  train.num_steps = 4
  train.log_every = 2
  train.eval_every = 4
  train.checkpoint_every = 2
  config.eval.batch_size = 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = 'voc_segmentation'
  config.data.train_split = 'train_aug'
  config.data.eval_split = 'val'
  config.data.crop_size = 513
  names = [part for part in (arg or 'r50_os16').split(',') if part]
  tiny = 'tiny' in names
  names = [part for part in names if part != 'tiny']
  if len(names) != 1:
    raise ValueError(f'configs/voc.py takes one preset optionally followed by ",tiny", got {arg!r}')
  backbone, output_stride, decoder, fusion = _parse(names[0])

  model = config.model
  model.backbone, model.depth = BACKBONES[backbone]
  model.stage_blocks = ()
  model.base_width = 64
  model.stem = 'deep'
  model.output_stride = output_stride
  model.multi_grid = (1, 1, 1)
  model.decoder = decoder
  model.fuse_features = fusion
  model.aspp = True
  model.aspp_channels = 256
  model.fuse_channels = 48
  model.decoder_channels = 256
  model.fuse_convs = 1
  model.decoder_convs = 0
  model.separable_convs = decoder == 'deeplabv3plus'
  model.num_components = num_components(backbone, output_stride)
  model.compute_dtype = 'bfloat16'
  if model.backbone == 'xception':  # timm's xception*.tf_in1k (DeepLab's TF weights) expect 0.5 / 0.5
    model.pixel_mean, model.pixel_std = TF_MEAN, TF_STD
    config.data.pad_pixel = TF_PAD_PIXEL
  model.require_pretrained = not tiny
  if tiny:
    _tiny(config)
  return config
