"""Every preset and command README.md documents works as written, in its smallest honest form.

The presets come from README's `configs/voc.py` preset table and the tools from its command table,
so an entry added there that does not work fails here. Every preset builds a config (for VOC and
PASCAL Context) and its `,tiny` variant a model; one `,tiny` preset per backbone x decoder trains
two steps and evaluates on the built-in data; every tool answers --help and runs once on the run
one of those trainings leaves.
"""
import importlib
import importlib.util
import itertools
import json
import logging
import pathlib
import re
import shutil

import numpy as np
import pytest
from flax import nnx

from configs import context, voc
from dunet_jax import train
from dunet_jax.data import datasets, synthetic
from dunet_jax.models import dunet
from helpers import REPO_ROOT, documented_tools, readme_table_rows, run_tool


def expand_braces(text: str) -> list[str]:
  """'a_{b,c}_d' -> ['a_b_d', 'a_c_d'] (one level, any number of groups), as bash expands them."""
  parts = re.split(r'\{([^{}]*)\}', text)
  choices = [[part] if index % 2 == 0 else part.split(',') for index, part in enumerate(parts)]
  return [''.join(combination) for combination in itertools.product(*choices)]


def documented_presets() -> list[str]:
  names = []
  for cell in readme_table_rows('`configs/voc.py` presets'):
    for quoted in re.findall(r'`([^`]+)`', cell):
      names += expand_braces(quoted)
  return names


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


def tiny_overrides(builtin_data) -> list[str]:
  """The --config overrides that point a `,tiny` preset at the shared data and train two steps."""
  return [f'--config.data.manual_dir={builtin_data.manual_dir}',
          f'--config.data.tfds_data_dir={builtin_data.tfds_data_dir}', '--config.train.num_steps=2',
          '--config.train.eval_every=2', '--config.train.checkpoint_every=2']


def tiny_config(preset: str, builtin_data):
  config = voc.get_config(f'{preset},tiny')
  for override in tiny_overrides(builtin_data):
    key, value = override.removeprefix('--config.').split('=')
    section, name = key.split('.')
    config[section][name] = type(config[section][name])(value)
  return config


_TRAINED = {}


def train_tiny(preset: str, builtin_data, directory) -> tuple:
  """(workdir, last evaluation) of `preset,tiny` trained two steps; each preset is trained once."""
  if preset not in _TRAINED:
    workdir = directory / f'run_{preset}'
    _TRAINED[preset] = workdir, train.train_and_evaluate(tiny_config(preset, builtin_data), workdir)
  return _TRAINED[preset]


@pytest.mark.parametrize('preset', one_preset_per_network())
def test_tiny_preset_trains_and_evaluates(preset, builtin_data, tmp_path_factory):
  workdir, result = train_tiny(preset, builtin_data, tmp_path_factory.getbasetemp())
  assert result['num_images'] == builtin_data.synthetic_num_val and np.isfinite(result['miou'])
  assert sorted(path.name for path in (workdir / 'checkpoints').iterdir() if path.name.isdigit()) == ['2']


RUN_PRESET = 'r50_os16'  # the run the tools are tried on


@pytest.fixture(scope='module')
def trained_run(builtin_data, tmp_path_factory):
  return train_tiny(RUN_PRESET, builtin_data, tmp_path_factory.getbasetemp())


def voc_file(builtin_data, name: str) -> pathlib.Path:
  return pathlib.Path(builtin_data.manual_dir) / 'VOCdevkit' / 'VOC2012' / name


@pytest.mark.parametrize('tool', TOOLS)
def test_tool_answers_help(tool, monkeypatch, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_tool(monkeypatch, tool, '--help')
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(importlib.import_module(f'dunet_jax.{tool}').__doc__.strip().splitlines()[0]), out
  assert '\n  --' in out


def _main(run, data, tmp_path):
  config = f'--config={REPO_ROOT}/configs/voc.py:{RUN_PRESET},tiny'
  return [config, *tiny_overrides(data), f'--workdir={run}'], 'Training already complete'


def _prepare(run, data, tmp_path):
  return [f'--config={REPO_ROOT}/configs/voc.py:{RUN_PRESET},tiny', *tiny_overrides(data)[:2]], 'ready at'


def _evaluate(run, data, tmp_path):
  return [f'--workdir={run}'], f'wrote {run / "eval_val_2.json"}'


def _predict(run, data, tmp_path):
  return [f'--workdir={run}', f'--input={voc_file(data, "JPEGImages/val_000000.jpg")}',
          f'--output={tmp_path / "predicted"}'], 'wrote 1 label maps'


def _score(run, data, tmp_path):
  predicted = tmp_path / 'predicted'
  predicted.mkdir()
  shutil.copy(voc_file(data, 'SegmentationClass/val_000000.png'), predicted)  # a perfect prediction
  (tmp_path / 'one.txt').write_text('val_000000\n')
  return [f'--pred_dir={predicted}', f'--label_dir={voc_file(data, "SegmentationClass")}',
          f'--list={tmp_path / "one.txt"}', '--num_classes=21'], '"pixel_accuracy": 1.0'


def _export(run, data, tmp_path):
  return [f'--workdir={run}', f'--output={tmp_path / "model.jaxexport"}', '--symbolic'], 'for cpu, cuda, tpu'


def _upper_bound(run, data, tmp_path):
  segmentation = voc_file(data, 'ImageSets/Segmentation')
  return [f'--label_dir={voc_file(data, "SegmentationClass")}', f'--train_list={segmentation / "train.txt"}',
          f'--val_list={segmentation / "val.txt"}', '--ratio=4', '--num_components=8', '--max_train=4',
          '--max_val=2', '--solver=exact', '--downsample=area'], '"val_maps": 2'


def _flops(run, data, tmp_path):
  return [f'--config={REPO_ROOT}/configs/voc.py:{RUN_PRESET},tiny', '--size=64'], '"total_gflops"'


def _convert_weights(run, data, tmp_path):
  from safetensors.numpy import save_file
  shapes = json.loads((REPO_ROOT / 'tests' / 'data' / 'state_dict_shapes.json').read_text())['shapes']
  save_file({key: np.zeros(shape, np.float32) for key, shape in shapes['resnet50'].items()},
            str(tmp_path / 'resnet50.safetensors'))
  return [f'--source={tmp_path / "resnet50.safetensors"}', '--arch=resnet50',
          f'--output={tmp_path / "resnet50.npz"}'], f'wrote {tmp_path / "resnet50.npz"}'


def _compile_check(run, data, tmp_path):
  """Compiling for a TPU slice needs libtpu (requirements-tpu-check.txt); without it, its one message."""
  expected = '"recommended_topology"' if importlib.util.find_spec('libtpu') else 'libtpu'
  return [f'--config={REPO_ROOT}/configs/voc.py:{RUN_PRESET},tiny', '--topology=v5e-4'], expected


# How each README command is tried: (arguments, text its output must hold) from (run, data, tmp_path).
TRIALS = {'main': _main, 'data.prepare': _prepare, 'evaluate': _evaluate, 'predict': _predict,
          'score': _score, 'export': _export, 'upper_bound': _upper_bound, 'flops': _flops,
          'convert_weights': _convert_weights, 'compile_check': _compile_check}


@pytest.mark.parametrize('tool', TOOLS)
def test_tool_runs_once(tool, trained_run, builtin_data, monkeypatch, capsys, caplog, tmp_path):
  assert tool in TRIALS, f'README documents dunet_jax.{tool}: add how to try it to TRIALS'
  workdir, _ = trained_run
  arguments, expected = TRIALS[tool](workdir, builtin_data, tmp_path)
  refusal = ''
  with caplog.at_level(logging.INFO):
    try:
      run_tool(monkeypatch, tool, *arguments)
    except SystemExit as exit_info:  # a tool that cannot run here ends with its one message
      refusal = str(exit_info.code)
  captured = capsys.readouterr()
  assert expected in captured.out + captured.err + caplog.text + refusal, captured.out[-2000:] + refusal
