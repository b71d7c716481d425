"""Dilated ResNet: feature names / strides / channels, dilation alignment, numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dunet_jax.models.resnet import ResNet, stage_dilations

TINY = (2, 2, 3, 2)


def _tiny(output_stride: int, stem: str = 'deep', stage_blocks=TINY) -> ResNet:
  model = ResNet(stage_blocks, base_width=8, stem=stem, output_stride=output_stride,
                 rngs=nnx.Rngs(0))
  model.eval()
  return model


def _randomize_batch_norm(model: nnx.Module, seed: int = 1) -> None:
  """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
  rng = np.random.RandomState(seed)
  for _, bn in nnx.iter_modules(model):
    if isinstance(bn, nnx.BatchNorm):
      n = bn.scale[...].shape[0]
      bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
      bn.bias[...] = jnp.asarray(rng.uniform(-0.2, 0.2, n), jnp.float32)
      bn.mean[...] = jnp.asarray(rng.uniform(-0.2, 0.2, n), jnp.float32)
      bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_feature_names_strides_and_channels(output_stride):
  model = _tiny(output_stride)
  info = model.feature_info()
  expected_names = {'conv1_1', 'conv1_2', 'conv1_3', 'out'} | {
      f'b{s}u{u}{c}' for s, n in enumerate(TINY, 1) for u in range(1, n + 1)
      for c in ('c1', 'c2', 'c3', '')}
  assert set(info) == expected_names
  stage_stride = {1: 4, 2: 8, 3: min(16, output_stride), 4: min(32, output_stride)}
  for stage, units in enumerate(TINY, 1):
    width = 8 * 2 ** (stage - 1)
    for unit in range(1, units + 1):
      c1_stride = stage_stride[stage - 1] if (unit == 1 and stage > 1) else stage_stride[stage]
      assert info[f'b{stage}u{unit}c1'] == (width, c1_stride)
      assert info[f'b{stage}u{unit}c2'] == (width, stage_stride[stage])
      assert info[f'b{stage}u{unit}c3'] == (4 * width, stage_stride[stage])
      assert info[f'b{stage}u{unit}'] == (4 * width, stage_stride[stage])
  assert info['conv1_3'] == (8, 2) and info['out'] == (256, output_stride)
  features = jax.jit(lambda x: model(x))(jnp.zeros((1, 64, 96, 3)))
  for name, (channels, stride) in info.items():
    assert features[name].shape == (1, 64 // stride, 96 // stride, channels), name


def test_dilations_follow_torchvision_replace_stride_with_dilation():
  # torchvision ResNet-50 with replace_stride_with_dilation: the first unit of a dilated stage
  # keeps the previous dilation, the later units use the doubled one; strides become 1.
  blocks = (3, 4, 6, 3)
  assert stage_dilations(blocks, 32, (1, 1, 1)) == ([1, 2, 2, 2], [[1] * 3, [1] * 4, [1] * 6, [1] * 3])
  assert stage_dilations(blocks, 16, (1, 1, 1)) == ([1, 2, 2, 1], [[1] * 3, [1] * 4, [1] * 6, [1, 2, 2]])
  assert stage_dilations(blocks, 8, (1, 1, 1)) == (
      [1, 2, 1, 1], [[1] * 3, [1] * 4, [1] + [2] * 5, [2, 4, 4]])
  assert stage_dilations(blocks, 16, (1, 2, 4))[1][3] == [2, 4, 8]  # DeepLabV3 multi-grid
  model = _tiny(8, stage_blocks=(1, 1, 3, 2))
  assert [block.conv2.dilation for block in model.layer3] == [1, 2, 2]
  assert [block.conv2.dilation for block in model.layer4] == [2, 4]
  assert [block.conv2.stride for block in model.layer4] == [1, 1]
  with pytest.raises(ValueError, match='output_stride'):
    stage_dilations(blocks, 4, (1, 1, 1))


@pytest.mark.parametrize('output_stride', [8, 16])
def test_dilated_network_samples_the_same_positions_as_the_strided_one(output_stride):
  # With torchvision's padding, a stride-2 conv equals the stride-1 conv read at even positions,
  # and a dilation-2 conv read at even positions equals the dilation-1 conv on the subsampled
  # map: the dilated network's features at every (32 / OS)-th pixel ARE the strided network's.
  strided, dilated = _tiny(32), _tiny(output_stride)
  _randomize_batch_norm(strided)
  nnx.update(dilated, nnx.state(strided))
  x = jnp.asarray(np.random.RandomState(0).randn(1, 64, 96, 3), jnp.float32)
  a, b = jax.jit(lambda x: strided(x))(x), jax.jit(lambda x: dilated(x))(x)
  step = 32 // output_stride
  for name in ('b4u1c2', 'b4u2c3', 'b4u2', 'out'):
    np.testing.assert_allclose(np.asarray(b[name][:, ::step, ::step]), np.asarray(a[name]),
                               rtol=1e-4, atol=1e-4)
  if output_stride == 8:
    np.testing.assert_allclose(np.asarray(b['b3u3c3'][:, ::2, ::2]), np.asarray(a['b3u3c3']),
                               rtol=1e-4, atol=1e-4)


# ---- independent numpy reference (PyTorch semantics: symmetric zero padding, NCHW-free) ----

def _np_conv(x, kernel, stride=1, dilation=1):
  """x (H, W, Ci), kernel (k, k, Ci, Co) HWIO, padding dilation*(k-1)//2 on every side."""
  k = kernel.shape[0]
  pad = dilation * (k - 1) // 2
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  height = (x.shape[0] + 2 * pad - dilation * (k - 1) - 1) // stride + 1
  width = (x.shape[1] + 2 * pad - dilation * (k - 1) - 1) // stride + 1
  out = np.zeros((height, width, kernel.shape[3]), np.float64)
  for di in range(k):
    for dj in range(k):
      patch = xp[di * dilation: di * dilation + stride * (height - 1) + 1: stride,
                 dj * dilation: dj * dilation + stride * (width - 1) + 1: stride]
      out += patch @ kernel[di, dj]
  return out


def _np_bn(x, bn):
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_max_pool(x):
  xp = np.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  height, width = (x.shape[0] - 1) // 2 + 1, (x.shape[1] - 1) // 2 + 1
  out = np.full((height, width, x.shape[2]), -np.inf)
  for di in range(3):
    for dj in range(3):
      out = np.maximum(out, xp[di: di + 2 * height - 1: 2, dj: dj + 2 * width - 1: 2])
  return out


def _relu(x):
  return np.maximum(x, 0)


def _np_conv_bn(x, conv, bn, relu=True):
  y = _np_bn(_np_conv(x, np.asarray(conv.kernel[...]), conv.stride, conv.dilation), bn)
  return _relu(y) if relu else y


def _np_bottleneck(x, block):
  """(c1, c2, c3, unit output): c3 is BN(conv3) before the residual add (DeepLab's end point)."""
  c1 = _np_conv_bn(x, block.conv1, block.bn1)
  c2 = _np_conv_bn(c1, block.conv2, block.bn2)
  c3 = _np_conv_bn(c2, block.conv3, block.bn3, relu=False)
  shortcut = x if block.downsample is None else _np_conv_bn(
      x, block.downsample.conv, block.downsample.bn, relu=False)
  return c1, c2, c3, _relu(c3 + shortcut)


@pytest.mark.parametrize('stem', ['standard', 'deep'])
def test_stem_and_first_two_stages_match_numpy_reference(stem):
  # Odd sizes exercise PyTorch's ceil-like output sizes of the stride-2 convs and max pool.
  model = _tiny(32, stem=stem, stage_blocks=(2, 2, 1, 1))
  _randomize_batch_norm(model)
  x = np.random.RandomState(3).randn(37, 45, 3).astype(np.float32)
  features = jax.jit(lambda x: model(x))(jnp.asarray(x[None]))
  if stem == 'standard':
    y = expected = {'conv1': _np_conv_bn(x, model.conv1, model.bn1)}['conv1']
    np.testing.assert_allclose(np.asarray(features['conv1'][0]), expected, rtol=1e-4, atol=1e-4)
  else:
    y = x
    for index in (1, 2, 3):
      y = _np_conv_bn(y, getattr(model, f'conv1_{index}'), getattr(model, f'bn1_{index}'))
      np.testing.assert_allclose(np.asarray(features[f'conv1_{index}'][0]), y, rtol=1e-4, atol=1e-4)
  y = _np_max_pool(y)
  for stage in (1, 2):
    for unit, block in enumerate(getattr(model, f'layer{stage}'), start=1):
      outputs = _np_bottleneck(y, block)
      for suffix, expected in zip(('c1', 'c2', 'c3', ''), outputs):
        got = np.asarray(features[f'b{stage}u{unit}{suffix}'][0])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got / scale, expected / scale, atol=1e-4)
      assert outputs[2].min() < 0  # c3 is taken before the ReLU: a post-add feature would fail here
      y = outputs[3]
  assert features['b2u1c2'].shape[1:3] == (5, 6)  # 37x45 -> 19x23 -> 10x12 -> 5x6
