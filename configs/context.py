"""PASCAL Context (60 classes with background, train 4,998 -> val 5,105) with the paper's networks.

`--config=configs/context.py:PRESET` takes the presets of configs/voc.py (default x71_os16, the
paper's best Context model; x65_os16 for its other row) and swaps in the dataset: crop 480 and
60 classes, background being class 0 and scored: the protocol of the numbers the paper's Context
table compares with (EncNet 51.7, RefineNet 47.3, DeepLab-v2 45.7 are 60-class figures; EncNet's
own 59-class figure is 52.6), so most likely the paper's (README, "Datasets").
`--config.data.context_classes=59 --config.data.num_classes=59` is the other common protocol
(background ignored as 255).
"""
import ml_collections

from configs import voc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = voc.get_config(arg or 'x71_os16')
  if config.data.synthetic:  # the ',tiny' variant trains on the built-in data
    return config
  data = config.data
  data.dataset = 'pascal_context'
  data.context_classes = 60
  data.num_classes = 60
  data.train_split = 'train'
  data.eval_split = 'val'
  data.crop_size = 480
  data.eval_pad_size = 512
  return config
