"""FLOPs of a tiny model against a hand count, and the CLI's output."""
import json
import subprocess
import sys

import pytest

from configs import voc
from dunet_jax import flops
from helpers import REPO_ROOT


def test_plain_dupsample_decoder_costs_its_hand_counted_flops():
  config = voc.get_config('r50_os16,tiny')
  model = config.model
  model.aspp, model.fuse_features, model.fuse_convs, model.decoder_convs = False, (), 0, 0
  size, classes, components = 64, config.data.num_classes, model.num_components
  positions = (size // 16) ** 2
  in_channels = 8 * 8 * 4  # stage 4 of a base-width-8 ResNet: 64 * expansion 4
  projection = 16 * 16 * classes
  expected = (2 * positions * (in_channels * components + components * projection)  # two matmuls
              + positions * components                                          # bias
              + size * size * classes)                                          # / T
  got = flops.measure_decoder(model, classes, size) * 1e9
  assert got == pytest.approx(expected, rel=0.02)


def test_parts_add_up_and_cli_prints_table_and_json():
  config = voc.get_config('r50_os16_b1u2c3,tiny')
  cost = flops.measure(config.model, config.data.num_classes, 64)
  assert cost.total_gflops == pytest.approx(
      cost.backbone_gflops + cost.aspp_gflops + cost.decoder_gflops)
  alone = flops.measure_decoder(config.model, config.data.num_classes, 64)
  assert cost.decoder_gflops == pytest.approx(alone, rel=0.2)  # elementwise ops fuse differently
  assert cost.total_params == cost.backbone_params + cost.aspp_params + cost.decoder_params
  result = subprocess.run(
      [sys.executable, '-m', 'dunet_jax.flops', '--config=configs/voc.py:r50_os16,tiny', '--size=64'],
      cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  lines = result.stdout.strip().splitlines()
  assert lines[1].split() == ['part', 'GFLOPs', 'params']
  record = json.loads(lines[-1])
  assert record['size'] == 64 and record['total_params'] > record['backbone_params'] > 0
