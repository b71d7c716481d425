"""PASCAL Context (59 classes, train 4,998 -> val 5,105) with the paper's networks.

`--config=configs/context.py:PRESET` takes the presets of configs/voc.py (default x71_os16, the
paper's best Context model; x65_os16 for its other row) and swaps in the dataset: crop 480, 59
classes with background ignored (the paper's protocol); `--config.data.context_classes=60
--config.data.num_classes=60` counts background as class 0 instead.
"""
import ml_collections

from configs import voc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = voc.get_config(arg or 'x71_os16')
  if config.data.synthetic:  # the ',tiny' variant trains on the built-in data
    return config
  data = config.data
  data.dataset = 'pascal_context'
  data.context_classes = 59
  data.num_classes = 59
  data.train_split = 'train'
  data.eval_split = 'val'
  data.crop_size = 480
  data.eval_pad_size = 512
  return config
