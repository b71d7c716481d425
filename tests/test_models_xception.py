"""Aligned Xception: one unit against a numpy reference, DeepLab's strides / dilations, feature names."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dunet_jax.models import dunet
from dunet_jax.models import pretrained
from dunet_jax.models import xception

EPSILON = 1e-3  # the TF weights' BatchNorm epsilon


def model_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(backbone='xception', depth=65, base_width=64, stage_blocks=(), output_stride=16,
                multi_grid=(1, 1, 1), compute_dtype='float32')
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def randomize(module: nnx.Module, seed: int) -> dict[str, np.ndarray]:
  """Fills every parameter and BN statistic (of a model from nnx.eval_shape) randomly; returns them."""
  rng = np.random.default_rng(seed)
  values = {}
  for path, variable in pretrained.flat_variables(module).items():
    shape = tuple(variable.shape)
    if path.endswith(('/var', '/scale')):
      value = rng.uniform(0.5, 1.5, shape)
    elif path.endswith('/kernel'):
      value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    else:
      value = rng.normal(0, 0.5, shape)
    values[path] = value.astype(np.float32)
    variable.set_value(jnp.asarray(values[path]))
  return values


def np_depthwise(x, kernel, stride, dilation):
  """Depthwise 3x3 conv, symmetric zero padding of `dilation`, by explicit taps. kernel (3, 3, 1, C)."""
  padded = np.pad(x, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
  height = (x.shape[1] - 1) // stride + 1
  width = (x.shape[2] - 1) // stride + 1
  out = np.zeros((x.shape[0], height, width, x.shape[3]), np.float64)
  for i in range(3):
    for j in range(3):
      window = padded[:, i * dilation:, j * dilation:][:, :(height - 1) * stride + 1:stride,
                                                       :(width - 1) * stride + 1:stride]
      out += window * kernel[i, j, 0]
  return out


def np_batch_norm(x, params, prefix):
  return ((x - params[f'{prefix}/mean']) / np.sqrt(params[f'{prefix}/var'] + EPSILON)
          * params[f'{prefix}/scale'] + params[f'{prefix}/bias'])


def np_unit(x, params, *, stride, dilation, shortcut, relu_inside):
  """DeepLab's xception_module in numpy (eval-mode BN)."""
  relu = lambda v: np.maximum(v, 0)  # noqa: E731
  h, outputs = x, []
  for conv in (1, 2, 3):
    if not relu_inside:
      h = relu(h)
    h = np_depthwise(h, params[f'conv{conv}/conv_dw/kernel'], stride if conv == 3 else 1, dilation)
    h = np_batch_norm(h, params, f'conv{conv}/bn_dw')
    if relu_inside:
      h = relu(h)
    h = np.einsum('bhwc,co->bhwo', h, params[f'conv{conv}/conv_pw/kernel'][0, 0])
    h = np_batch_norm(h, params, f'conv{conv}/bn_pw')
    if relu_inside:
      h = relu(h)
    outputs.append(h)
  if shortcut == 'conv':
    skip = np.einsum('bhwc,co->bhwo', x[:, ::stride, ::stride], params['shortcut/conv/kernel'][0, 0])
    h = h + np_batch_norm(skip, params, 'shortcut/bn')
  elif shortcut == 'identity':
    h = h + x
  return h, outputs


@pytest.mark.parametrize('spec, stride, dilation', [
    (xception.UnitSpec('efb2u1', (16, 16, 24), 2, 'conv'), 2, 1),              # entry flow, strided
    (xception.UnitSpec('mfb1u1', (8, 8, 8), 1, 'identity'), 1, 2),             # middle flow, dilated
    (xception.UnitSpec('exb2u1', (12, 12, 16), 1, 'none', relu_inside=True), 1, 1),  # exit flow end
])
def test_unit_matches_numpy_reference(spec, stride, dilation):
  unit = nnx.eval_shape(lambda: xception.XceptionUnit(8, spec, stride=stride, dilations=(dilation,) * 3,
                                                      dtype=jnp.float32, rngs=nnx.Rngs(0)))
  params = randomize(unit, seed=stride + dilation)
  unit.eval()
  x = np.random.default_rng(3).normal(size=(2, 11, 14, 8)).astype(np.float32)
  with jax.default_matmul_precision('highest'):
    out, convs = nnx.jit(lambda module, inputs: module(inputs))(unit, jnp.asarray(x))
  expected, expected_convs = np_unit(x.astype(np.float64), params, stride=stride, dilation=dilation,
                                     shortcut=spec.shortcut, relu_inside=spec.relu_inside)
  assert out.shape == expected.shape == (2, 6 if stride == 2 else 11, 7 if stride == 2 else 14, spec.widths[2])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  for got, want in zip(convs, expected_convs):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def expected_x65_features(output_stride: int) -> dict[str, tuple[int, int]]:
  """DeepLab's Xception-65 end points: (channels, stride), written out from its block table."""
  def stride(nominal):
    return min(nominal, output_stride)
  table = {'conv1_1': (32, 2), 'conv1_2': (64, 2)}
  entry = [('efb1u1', 128, 2), ('efb2u1', 256, 4), ('efb3u1', 728, 8)]
  for name, width, input_stride in entry:
    table.update({f'{name}c1': (width, input_stride), f'{name}c2': (width, input_stride),
                  f'{name}c3': (width, stride(2 * input_stride)), name: (width, stride(2 * input_stride))})
  for unit in range(1, 17):
    name = f'mfb1u{unit}'
    table.update({f'{name}c{conv}': (728, stride(16)) for conv in (1, 2, 3)}, **{name: (728, stride(16))})
  table.update({'exb1u1c1': (728, stride(16)), 'exb1u1c2': (1024, stride(16)),
                'exb1u1c3': (1024, stride(32)), 'exb1u1': (1024, stride(32)),
                'exb2u1c1': (1536, stride(32)), 'exb2u1c2': (1536, stride(32)),
                'exb2u1c3': (2048, stride(32)), 'exb2u1': (2048, stride(32)), 'out': (2048, output_stride)})
  return table


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_xception65_feature_names_channels_and_strides(output_stride):
  _, info = xception.plan(65, output_stride=output_stride)
  assert info == expected_x65_features(output_stride)
  assert info['efb2u1c2'] == (256, 4)       # the paper's low-level feature, 1/4
  assert info['mfb1u16c3'][1] == min(16, output_stride)


@pytest.mark.parametrize('depth, output_stride, multi_grid, rates', [
    # DeepLab: the unit whose stride is dropped keeps the old rate; later units multiply it.
    (65, 16, (1, 1, 1), {'efb3u1': (2, 1), 'mfb1u16': (1, 1), 'exb1u1': (1, 1), 'exb2u1': (1, 2)}),
    (65, 8, (1, 2, 4), {'efb2u1': (2, 1), 'efb3u1': (1, 1), 'mfb1u1': (1, 2), 'exb1u1': (1, 2),
                        'exb2u1': (1, 4)}),
    (71, 16, (1, 1, 1), {'efb5u1': (2, 1), 'mfb1u1': (1, 1), 'exb1u1': (1, 1), 'exb2u1': (1, 2)}),
])
def test_strides_and_dilations_follow_deeplab(depth, output_stride, multi_grid, rates):
  units = {unit.spec.name: unit for unit in xception.plan(depth, output_stride=output_stride,
                                                           multi_grid=multi_grid)[0]}
  for name, (stride, rate) in rates.items():
    grid = multi_grid if name == 'exb2u1' else (1, 1, 1)
    assert (units[name].stride, units[name].dilations) == (stride, tuple(rate * g for g in grid)), name
  assert units['exb1u1'].spec.shortcut == 'conv'  # kept when its stride is dropped, as in DeepLab


@pytest.mark.parametrize('depth, output_stride, dtype', [
    (65, 8, 'float32'), (65, 16, 'bfloat16'), (65, 32, 'float32'), (71, 16, 'float32')])
def test_tiny_forward_returns_every_feature_at_its_stride(depth, output_stride, dtype):
  config = model_config(depth=depth, base_width=8, stage_blocks=(1,), output_stride=output_stride,
                        compute_dtype=dtype)
  backbone = nnx.eval_shape(lambda: dunet.build_backbone(config, rngs=nnx.Rngs(0)))
  randomize(backbone, seed=output_stride)
  backbone.eval()
  features = nnx.jit(lambda model, x: model(x))(backbone, jnp.zeros((2, 64, 96, 3)) + 0.5)
  info = backbone.feature_info()
  assert set(features) == set(info)
  assert {'efb2u1c2', 'mfb1u1c3', 'exb2u1c3', 'out'} <= set(features)
  for name, (channels, stride) in info.items():
    assert features[name].shape == (2, 64 // stride, 96 // stride, channels), name
    assert features[name].dtype == jnp.dtype(dtype), name
  assert info['out'][1] == output_stride
  assert np.isfinite(np.asarray(features['out'], np.float32)).all()
