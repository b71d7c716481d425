"""Every preset and command README.md documents works as written, in its smallest honest form.

The presets come from README's `configs/voc.py` preset table and the tools from its command table,
so an entry added there that does not work fails here. Every preset builds a config (for VOC and
PASCAL Context) and its `,tiny` variant a model; one `,tiny` preset per backbone x decoder trains
two steps and evaluates on the built-in data; every tool answers --help and runs once on the run
one of those trainings leaves.
"""
import itertools
import re

import numpy as np
import pytest
from flax import nnx

from configs import context, voc
from dunet_jax import train
from dunet_jax.data import datasets, synthetic
from dunet_jax.models import dunet
from test_inference import REPO_ROOT

README = (REPO_ROOT / 'README.md').read_text()


def expand_braces(text: str) -> list[str]:
  """'a_{b,c}_d' -> ['a_b_d', 'a_c_d'] (one level, any number of groups), as bash expands them."""
  parts = re.split(r'\{([^{}]*)\}', text)
  choices = [[part] if index % 2 == 0 else part.split(',') for index, part in enumerate(parts)]
  return [''.join(combination) for combination in itertools.product(*choices)]


def readme_table_rows(heading: str) -> list[str]:
  """First cells of the markdown table that follows the first line starting with `heading`."""
  lines = README[README.index(heading):].splitlines()[1:]
  rows, started = [], False
  for line in lines:
    if line.startswith('|'):
      started = True
      rows.append(line.split('|')[1].strip())
    elif started:
      break
  return rows[2:]  # the header row and its --- line


def documented_presets() -> list[str]:
  names = []
  for cell in readme_table_rows('`configs/voc.py` presets'):
    for quoted in re.findall(r'`([^`]+)`', cell):
      names += expand_braces(quoted)
  return names


def documented_tools() -> list[str]:
  """'main', 'data.prepare', ... for every `python -m dunet_jax.<tool>` row of the command table."""
  return [re.match(r'`python -m dunet_jax\.([\w.]+)', cell).group(1)
          for cell in readme_table_rows('## Commands')]


PRESETS = documented_presets()
TOOLS = documented_tools()


def one_preset_per_network() -> list[str]:
  """For each (backbone, decoder) pair of the README, its preset whose tiny variant is smallest."""
  chosen = {}
  for name in sorted(PRESETS, key=lambda name: sum(voc.get_config(f'{name},tiny').model.stage_blocks)):
    model = voc.get_config(name).model
    chosen.setdefault((model.backbone, model.decoder), name)
  return sorted(chosen.values())


def test_readme_tables_were_read():
  assert len(PRESETS) == len(set(PRESETS)) >= 15 and {'r50_os16', 'x71_os16'} <= set(PRESETS)
  assert {'main', 'evaluate', 'predict', 'export', 'data.prepare'} <= set(TOOLS)


@pytest.mark.parametrize('preset', PRESETS)
def test_preset_builds_and_its_tiny_variant_fits_the_builtin_data(preset):
  full = voc.get_config(preset)
  assert context.get_config(preset).model.to_dict() == full.model.to_dict()
  config = voc.get_config(f'{preset},tiny')
  for key in ('backbone', 'decoder', 'fuse_features', 'output_stride', 'aspp'):
    assert config.model[key] == full.model[key], key
  assert config.data.synthetic
  stride = config.model.output_stride
  assert config.data.eval_pad_size >= synthetic.MAX_SIDE and config.data.eval_pad_size % stride == 0
  model = nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes, reconstruction=None,
                                             rngs=nnx.Rngs(0)))
  assert model.output_stride == stride
  assert set(config.model.fuse_features) <= set(model.backbone.feature_info())
  hash(nnx.graphdef(model))  # jit and the evaluation step's cache key on it


@pytest.fixture(scope='session')
def builtin_data(tmp_path_factory):
  """The built-in data the tiny presets use, generated once (where tests/test_inference.py puts it)."""
  root = tmp_path_factory.getbasetemp() / 'synthetic'
  data = voc.get_config('r50_os16,tiny').data
  data.manual_dir, data.tfds_data_dir = str(root / 'manual'), str(root / 'tfds')
  datasets.prepare(data)
  return data


def tiny_config(preset: str, builtin_data):
  config = voc.get_config(f'{preset},tiny')
  config.data.manual_dir, config.data.tfds_data_dir = builtin_data.manual_dir, builtin_data.tfds_data_dir
  config.train.num_steps = config.train.eval_every = config.train.checkpoint_every = 2
  return config


@pytest.mark.parametrize('preset', one_preset_per_network())
def test_tiny_preset_trains_and_evaluates(preset, builtin_data, tmp_path):
  config = tiny_config(preset, builtin_data)
  result = train.train_and_evaluate(config, tmp_path)
  assert result['num_images'] == config.data.synthetic_num_val and np.isfinite(result['miou'])
  assert sorted(path.name for path in (tmp_path / 'checkpoints').iterdir() if path.name.isdigit()) == ['2']
