"""convert_weights + pretrained: the real torchvision / timm key names, a round trip, loud failures.

tests/data/state_dict_shapes.json holds the key -> shape lists of the real libraries' state
dicts (written once by tests/data/generate_state_dict_shapes.py), so CI checks the mapping
without torch.
"""
import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dunet_jax import convert_weights
from dunet_jax.models import pretrained
from dunet_jax.models import xception
from helpers import REPO_ROOT

SHAPES = json.loads((REPO_ROOT / 'tests' / 'data' / 'state_dict_shapes.json').read_text())['shapes']
HEADS = {'resnet': {'fc.weight', 'fc.bias'}, 'xception': {'head.fc.weight', 'head.fc.bias'}}


def zeros_state_dict(arch: str) -> dict[str, np.ndarray]:
  """The library's state dict for `arch` as zero views (no memory)."""
  return {key: np.broadcast_to(np.float32(0), shape) for key, shape in SHAPES[arch].items()}


@pytest.mark.parametrize('arch', ['resnet50', 'resnet101', 'resnet50c', 'xception65', 'xception71'])
def test_every_library_tensor_is_mapped_or_listed_as_dropped(arch):
  arrays, dropped = convert_weights.convert(zeros_state_dict(arch), arch)
  expected_dropped = HEADS[convert_weights.ARCHS[arch].family] | {
      key for key in SHAPES[arch] if key.endswith('.num_batches_tracked')}
  assert set(dropped) == expected_dropped
  assert len(arrays) + len(dropped) == len(SHAPES[arch])
  ours = convert_weights.target_shapes(arch)
  assert set(arrays) == set(ours)
  assert {path: array.shape for path, array in arrays.items()} == ours


def test_timm_d_resnet_is_refused_as_its_c_twin():
  # timm's 'd' shortcut is (AvgPool2d, conv, BN), tensors downsample.1 / .2; ours is a strided conv.
  assert 'resnet101d' not in convert_weights.ARCHS
  with pytest.raises(convert_weights.ConversionError, match=r'layer1\.0\.downsample\.2\.weight'):
    convert_weights.convert(zeros_state_dict('resnet101d'), 'resnet101c')


def test_layouts_follow_oihw_to_hwio():
  rng = np.random.default_rng(0)
  state = zeros_state_dict('resnet50')
  conv = state['layer2.0.conv2.weight'] = rng.normal(size=SHAPES['resnet50']['layer2.0.conv2.weight'])
  variance = state['layer2.0.bn2.running_var'] = rng.uniform(size=(128,))
  arrays, _ = convert_weights.convert(state, 'resnet50')
  kernel = arrays['layer2/0/conv2/kernel']
  assert kernel.shape == (3, 3, 128, 128) and kernel.dtype == np.float32
  assert kernel[2, 0, 5, 7] == np.float32(conv[7, 5, 2, 0])   # HWIO[h, w, i, o] = OIHW[o, i, h, w]
  np.testing.assert_array_equal(arrays['layer2/0/bn2/var'], variance.astype(np.float32))

  state = zeros_state_dict('xception65')
  depthwise = state['blocks.1.stack.conv2.conv_dw.weight'] = rng.normal(size=(256, 1, 3, 3))
  arrays, _ = convert_weights.convert(state, 'xception65')
  kernel = arrays['units/efb2u1/conv2/conv_dw/kernel']
  assert kernel.shape == (3, 3, 1, 256)
  assert kernel[0, 2, 0, 9] == np.float32(depthwise[9, 0, 0, 2])


def test_timm_block_indices_follow_deeplab_flows():
  # DeepLab's Xception-71 entry flow has 5 blocks, Xception-65's 3; then 16 middle units, 2 exit blocks.
  x71 = xception.unit_names(71)
  assert len(x71) == 23 and x71[4] == 'efb5u1' and x71[5] == 'mfb1u1' and x71[20] == 'mfb1u16'
  assert x71[21:] == ['exb1u1', 'exb2u1']
  x65 = xception.unit_names(65)
  assert len(x65) == 21 and x65[2] == 'efb3u1' and x65[18] == 'mfb1u16' and x65[19:] == ['exb1u1', 'exb2u1']
  assert convert_weights.target_path('xception71', 'blocks.21.shortcut.bn.running_mean', 1) == (
      'units/exb1u1/shortcut/bn/mean')
  assert convert_weights.target_path('xception65', 'stem.1.conv.weight', 4) == 'conv1_2/conv/kernel'


@pytest.mark.parametrize('change, named', [
    (lambda s: s.__setitem__('layer5.0.conv1.weight', np.zeros((64, 64, 1, 1))), 'layer5.0.conv1.weight'),
    (lambda s: s.pop('layer1.0.bn1.running_var'), 'layer1/0/bn1/var'),
    (lambda s: s.__setitem__('layer1.0.conv1.weight', np.zeros((64, 64, 3, 3))), 'layer1.0.conv1.weight'),
    (lambda s: s.__setitem__('layer1.0.conv2.bias', np.zeros((64,))), 'layer1.0.conv2.bias'),
])
def test_converter_names_unmapped_missing_and_misshaped_keys(change, named):
  state = zeros_state_dict('resnet50')
  change(state)
  with pytest.raises(convert_weights.ConversionError, match=named.replace('.', r'\.')):
    convert_weights.convert(state, 'resnet50')


def test_safetensors_round_trip_fills_every_tensor(tmp_path, capsys):
  rng = np.random.default_rng(1)
  state = {key: rng.standard_normal(shape, dtype=np.float32) for key, shape in SHAPES['resnet50'].items()
           if not key.endswith('num_batches_tracked')}
  source, output = tmp_path / 'resnet50.safetensors', tmp_path / 'resnet50.npz'
  save_file(state, str(source))
  counts = convert_weights.convert_file(str(source), 'resnet50', str(output))
  assert counts == {'read': 267, 'mapped': 265, 'dropped': 2}
  backbone = nnx.eval_shape(lambda: convert_weights.build_backbone('resnet50'))
  assert pretrained.load_backbone_weights(backbone, output) == 'resnet50'
  assert 'loaded 265 tensors' in capsys.readouterr().out
  variables = pretrained.flat_variables(backbone)
  np.testing.assert_array_equal(np.asarray(variables['conv1/kernel'][...]),
                                state['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(variables['layer4/2/bn3/mean'][...]),
                                state['layer4.2.bn3.running_mean'])
  np.testing.assert_array_equal(np.asarray(variables['layer3/0/downsample/bn/scale'][...]),
                                state['layer3.0.downsample.1.weight'])


def tiny_xception() -> nnx.Module:
  config = ml_collections.ConfigDict(dict(depth=65, base_width=8, stage_blocks=(1,), output_stride=16,
                                          multi_grid=(1, 1, 1), compute_dtype='float32'))
  return nnx.eval_shape(lambda: xception.Xception(config, rngs=nnx.Rngs(0)))


def write_npz(path, arrays, arch='xception65'):
  np.savez(path, **arrays, __arch__=np.asarray(arch), __source__=np.asarray('test'))


def test_loader_fills_a_matching_file(tmp_path):
  shapes = pretrained.parameter_shapes(tiny_xception())
  arrays = {key: np.full(shape, index, np.float32) for index, (key, shape) in enumerate(shapes.items())}
  write_npz(tmp_path / 'w.npz', arrays)
  backbone = tiny_xception()
  pretrained.load_backbone_weights(backbone, tmp_path / 'w.npz', verbose=False)
  for key, variable in pretrained.flat_variables(backbone).items():
    np.testing.assert_array_equal(np.asarray(variable[...]), arrays[key])


@pytest.mark.parametrize('edit, named', [
    (lambda a: a.pop('units/efb2u1/conv2/bn_dw/var'), 'units/efb2u1/conv2/bn_dw/var'),
    (lambda a: a.__setitem__('units/efb9u1/conv1/conv_dw/kernel', np.zeros((3, 3, 1, 8))),
     'units/efb9u1/conv1/conv_dw/kernel'),
    (lambda a: a.__setitem__('conv1_1/conv/kernel', np.zeros((3, 3, 3, 5))), 'conv1_1/conv/kernel'),
])
def test_loader_names_missing_unexpected_and_misshaped_keys(tmp_path, edit, named):
  shapes = pretrained.parameter_shapes(tiny_xception())
  arrays = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
  edit(arrays)
  write_npz(tmp_path / 'w.npz', arrays)
  with pytest.raises(pretrained.PretrainedWeightsError, match=named):
    pretrained.load_backbone_weights(tiny_xception(), tmp_path / 'w.npz')


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
  (tmp_path / 'weights.pth').write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(convert_weights.ConversionError, match='safetensors'):
    convert_weights.read_state_dict(tmp_path / 'weights.pth')


def test_cli_reports_a_missing_source(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'dunet_jax.convert_weights', f'--source={tmp_path / "none.safetensors"}',
       '--arch=xception65', f'--output={tmp_path / "x.npz"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'none.safetensors: no such file' in result.stderr
  assert not (tmp_path / 'x.npz').exists()
