"""The CPU convolution path (shifted matmuls) against XLA's convolution, and where each is lowered."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from dunet_jax.models import cpu_conv
from dunet_jax.models.dunet import DUNet
from dunet_jax.models.layers import Conv2d


def _forward_and_grads(conv, x, kernel, weights):
  """Output and d(sum(output * weights))/d(x, kernel): a loss that reaches every output element."""
  def loss(x, kernel):
    y = conv(x, kernel)
    return jnp.sum(y.astype(jnp.float32) * weights), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
  return y, grads


@pytest.mark.parametrize('size,dilation', [(3, 1), (3, 2), (3, 4), (5, 2)])
def test_shifted_matmuls_equal_xla_convolution_float32(dilation, size):
  # Odd sizes and two images, so that a tap leaking across a row or image boundary shows.
  rng = np.random.default_rng(dilation * 10 + size)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((size, size, 5, 6)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 9, 7, 6)), jnp.float32)
  xla = lambda x, k: cpu_conv.xla_conv(x, k, stride=1, dilation=dilation, groups=1)  # noqa: E731
  matmul = lambda x, k: cpu_conv.shifted_matmul_conv(x, k, dilation)  # noqa: E731
  y_ref, (dx_ref, dk_ref) = _forward_and_grads(xla, x, kernel, weights)
  y, (dx, dk) = _forward_and_grads(matmul, x, kernel, weights)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


def test_shifted_matmuls_bfloat16_within_rounding():
  rng = np.random.default_rng(0)
  x32 = rng.standard_normal((2, 11, 6, 16)).astype(np.float32)
  k32 = (0.1 * rng.standard_normal((3, 3, 16, 8))).astype(np.float32)
  weights = jnp.asarray(rng.standard_normal((2, 11, 6, 8)), jnp.float32)
  x = jnp.asarray(x32, jnp.bfloat16)
  xla = lambda x, k: cpu_conv.xla_conv(x, k.astype(x.dtype), stride=1, dilation=2, groups=1)  # noqa: E731
  matmul = lambda x, k: cpu_conv.shifted_matmul_conv(x, k, 2)  # noqa: E731
  y_ref, (dx_ref, dk_ref) = _forward_and_grads(xla, x, jnp.asarray(k32), weights)
  y, (dx, dk) = _forward_and_grads(matmul, x, jnp.asarray(k32), weights)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  # bf16 keeps 8 bits: both round the float32-accumulated sums once, so they agree to ~2^-8.
  for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_bfloat16_gradient_dots_stay_bfloat16_on_cpu():
  # XLA:CPU converts a bf16 dot's operands to float32 unless both are row-major (contracting
  # dimension last on the left, first on the right); a transpose it folds into the dot, as a `.T`
  # of the kernel-gradient operand was, turns the dot float32. The forward, input-gradient and
  # kernel-gradient dots (27 for 3x3) must all take bf16 operands.
  x = jnp.zeros((2, 6, 5, 16), jnp.bfloat16)
  kernel = jnp.zeros((3, 3, 16, 8), jnp.float32)
  weights = jnp.ones((2, 6, 5, 8), jnp.float32)
  def loss(x, kernel):
    return jnp.sum(cpu_conv.shifted_matmul_conv(x, kernel, 2).astype(jnp.float32) * weights)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  computations = re.split(r'\n(?=\S)', compiled)  # one per block of the HLO module
  with_dots = [c for c in computations if re.search(r'\sdot\(', c)]
  assert sum(len(re.findall(r'\sdot\(', c)) for c in with_dots) == 27
  for computation in with_dots:
    parameters = re.findall(r'= (\w+)\[[\d,]*\]\S* parameter\(', computation)
    assert parameters and set(parameters) == {'bf16'}, computation.splitlines()[0]


@pytest.mark.parametrize('stride,dilation,depthwise', [
    (1, 1, False), (1, 2, False), (1, 4, False), (2, 1, False), (1, 2, True), (2, 1, True)])
def test_conv2d_implementations_agree(stride, dilation, depthwise):
  channels = 6
  groups = channels if depthwise else 1
  conv = Conv2d(channels, channels, 3, stride=stride, dilation=dilation, groups=groups,
                rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 13, 9, channels)), jnp.float32)

  def run(implementation):
    conv.implementation = implementation
    def loss(conv, x):
      y = conv(x)
      return jnp.sum(y ** 2), y
    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, y), (kernel_grad, x_grad) = grad_fn(conv, x)
    return y, value, (*jax.tree.leaves(kernel_grad), x_grad)

  y_ref, value_ref, grads_ref = run('xla')
  y, value, grads = run('matmul')
  assert y.shape == y_ref.shape == (2, -(-13 // stride), -(-9 // stride), channels)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for got, want in zip(grads, grads_ref):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _lowered_text(platform: str) -> str:
  """StableHLO of a bf16 3x3 conv's gradients with implementation='matmul', lowered for `platform`."""
  x = jnp.zeros((1, 6, 5, 16), jnp.bfloat16)
  kernel = jnp.zeros((3, 3, 16, 8), jnp.float32)

  def loss(x, kernel):
    y = cpu_conv.conv2d(x, kernel, dilation=2, implementation='matmul')
    return jnp.sum(y.astype(jnp.float32))

  def f(x, kernel):
    return jax.grad(loss, argnums=(0, 1))(x, kernel)
  return jax.jit(f).trace(x, kernel).lower(lowering_platforms=(platform,)).as_text()


def test_matmuls_only_when_lowered_for_cpu():
  cpu = _lowered_text('cpu')
  assert 'stablehlo.convolution' not in cpu and 'stablehlo.dot_general' in cpu
  for platform in ('tpu', 'cuda'):  # traced on this CPU host, lowered for an accelerator
    accelerator = _lowered_text(platform)
    assert 'stablehlo.convolution' in accelerator, platform
    assert 'stablehlo.dot_general' not in accelerator, platform


def test_dunet_same_weights_same_outputs_with_either_implementation():
  config = synthetic.get_config('test').model
  config.compute_dtype = 'float32'
  config.cpu_conv = 'matmul'
  w = np.linalg.qr(np.random.default_rng(3).standard_normal((config.output_stride ** 2 * 21, 16)))[0]
  model = DUNet(config, 21, reconstruction=w.astype(np.float32), rngs=nnx.Rngs(0))
  model.eval()
  convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, Conv2d)]
  assert convs and all(conv.implementation == 'matmul' for conv in convs)
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 48, 40, 3)), jnp.float32)
  forward = lambda model, images: model(images)  # noqa: E731
  params = nnx.state(model, nnx.Param)
  with_matmuls = nnx.jit(forward)(model, images)
  for conv in convs:
    conv.implementation = 'xla'
  # The implementation is no parameter: the same state (a checkpoint) serves either.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params)
  np.testing.assert_allclose(with_matmuls, nnx.jit(forward)(model, images), rtol=1e-4, atol=1e-4)


def test_unknown_implementation_is_refused():
  config = synthetic.get_config('test').model
  config.cpu_conv = 'cudnn'
  with pytest.raises(ValueError, match='model.cpu_conv'):
    DUNet(config, 21, reconstruction=np.eye(config.output_stride ** 2 * 21, 16, dtype=np.float32), rngs=nnx.Rngs(0))
