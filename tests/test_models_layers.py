"""The CPU convolution path (bf16 matmuls) against XLA's convolution, and where each is lowered."""
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


@pytest.mark.parametrize('size,dilation', [(1, 1), (3, 1), (3, 2), (3, 4), (5, 2)])
def test_matmul_conv_equals_xla_convolution_float32(dilation, size):
  # Odd sizes and two images, so that a tap leaking across a row or image boundary shows.
  rng = np.random.default_rng(dilation * 10 + size)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((size, size, 5, 6)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 9, 7, 6)), jnp.float32)
  xla = lambda x, k: cpu_conv.xla_conv(x, k, stride=1, dilation=dilation, groups=1)  # noqa: E731
  matmul = lambda x, k: cpu_conv.matmul_conv(x, k, dilation)  # noqa: E731
  with jax.default_matmul_precision('highest'):
    y_ref, (dx_ref, dk_ref) = _forward_and_grads(xla, x, kernel, weights)
    y, (dx, dk) = _forward_and_grads(matmul, x, kernel, weights)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


def test_matmul_conv_bfloat16_within_rounding():
  rng = np.random.default_rng(0)
  x32 = rng.standard_normal((2, 11, 6, 16)).astype(np.float32)
  k32 = (0.1 * rng.standard_normal((3, 3, 16, 8))).astype(np.float32)
  weights = jnp.asarray(rng.standard_normal((2, 11, 6, 8)), jnp.float32)
  x = jnp.asarray(x32, jnp.bfloat16)
  xla = lambda x, k: cpu_conv.xla_conv(x, k.astype(x.dtype), stride=1, dilation=2, groups=1)  # noqa: E731
  matmul = lambda x, k: cpu_conv.matmul_conv(x, k, 2)  # noqa: E731
  y_ref, (dx_ref, dk_ref) = _forward_and_grads(xla, x, jnp.asarray(k32), weights)
  y, (dx, dk) = _forward_and_grads(matmul, x, jnp.asarray(k32), weights)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  # bf16 keeps 8 bits: both round the float32-accumulated sums once, so they agree to ~2^-8.
  for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize('size,stride,dilation,dots', [
    (3, 1, 2, 3), (1, 1, 1, 3), (1, 2, 1, 3), (3, 2, 1, 6)])  # stride 2, 3x3: two row phases
def test_bfloat16_gradient_dots_stay_bfloat16_on_cpu(size, stride, dilation, dots):
  # XLA:CPU converts a bf16 dot's operands to float32 unless both are row-major (contracting
  # dimension last on the left, first on the right) and the result is float32; a transpose it
  # folds into the dot turns the dot float32. The forward, input-gradient and kernel-gradient dots
  # must all take bf16 operands.
  x = jnp.zeros((2, 6, 5, 16), jnp.bfloat16)
  kernel = jnp.zeros((size, size, 16, 8), jnp.float32)
  weights = jnp.ones((2, -(-6 // stride), -(-5 // stride), 8), jnp.float32)
  def loss(x, kernel):
    y = cpu_conv.conv2d(x, kernel, stride=stride, dilation=dilation, implementation='matmul')
    return jnp.sum(y.astype(jnp.float32) * weights)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  computations = re.split(r'\n(?=\S)', compiled)  # one per block of the HLO module
  with_dots = [c for c in computations if re.search(r'\sdot\(', c)]
  assert sum(len(re.findall(r'\sdot\(', c)) for c in with_dots) == dots
  assert 'convolution(' not in compiled
  for computation in with_dots:
    parameters = re.findall(r'= (\w+)\[[\d,]*\]\S* parameter\(', computation)
    assert parameters and set(parameters) == {'bf16'}, computation.splitlines()[0]


@pytest.mark.parametrize('size,stride,dilation,depthwise', [
    (3, 1, 1, False), (3, 1, 2, False), (3, 1, 4, False), (3, 2, 1, False), (3, 1, 2, True),
    (3, 2, 1, True), (1, 1, 1, False), (1, 2, 1, False)])
def test_conv2d_implementations_agree(size, stride, dilation, depthwise):
  # bf16 in, as on CPU in training: 'matmul' runs its matmuls only for bf16 convolutions.
  channels = 6
  groups = channels if depthwise else 1
  conv = Conv2d(channels, channels, size, stride=stride, dilation=dilation, groups=groups,
                dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 13, 9, channels)), jnp.bfloat16)

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
  assert y.dtype == grads[-1].dtype == jnp.bfloat16
  # Both accumulate in float32 and round once to bf16 (8 bits): they agree to ~2^-8.
  for got, want in zip((y, value, *grads), (y_ref, value_ref, *grads_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


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


def test_dunet_same_weights_same_outputs_and_gradients_with_either_implementation():
  # Same parameters, bf16 compute: the matmul path is as close to the float32 network as XLA's
  # bf16 convolutions are (bf16 rounding is the only difference either has).
  config = synthetic.get_config('test').model
  config.cpu_conv = 'matmul'
  w = np.linalg.qr(np.random.default_rng(3).standard_normal((config.output_stride ** 2 * 21, 16)))[0]
  models = {}
  for dtype in ('bfloat16', 'float32'):
    config.compute_dtype = dtype
    models[dtype] = DUNet(config, 21, reconstruction=w.astype(np.float32), rngs=nnx.Rngs(0))
    models[dtype].eval()
  convs = [m for _, m in nnx.iter_modules(models['bfloat16']) if isinstance(m, Conv2d)]
  assert convs and all(conv.implementation == 'matmul' for conv in convs)
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 48, 40, 3)), jnp.float32)
  def loss(model, images):
    logits = model(images).astype(jnp.float32)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
  value_and_grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  params = nnx.state(models['bfloat16'], nnx.Param)
  lowered, results = {}, {}
  for implementation in ('matmul', 'xla'):
    for conv in convs:
      conv.implementation = implementation
    lowered[implementation] = jax.jit(lambda images: models['bfloat16'](images)).lower(images).as_text()
    results[implementation] = value_and_grad(models['bfloat16'], images)
  with jax.default_matmul_precision('highest'):
    (_, logits_f32), grads_f32 = value_and_grad(models['float32'], images)
  # The implementation is no parameter: the same state (a checkpoint) serves either.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(models['bfloat16'], nnx.Param), params)
  # Only convolutions of fewer than MIN_CHANNELS inputs (the RGB image, this tiny net's stem)
  # stay XLA's.
  kernels = re.findall(r'stablehlo\.convolution\(.*?tensor<\w+>, tensor<\d+x\d+x(\d+)x\d+x', lowered['matmul'])
  assert kernels and all(int(channels) < cpu_conv.MIN_CHANNELS for channels in kernels), kernels
  assert lowered['xla'].count('stablehlo.convolution(') > len(kernels) + 5

  def error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-12)
  for implementation, ((_, logits), grads) in results.items():
    assert error(logits, logits_f32) < 2e-2, implementation
  errors = {implementation: [error(got, want) for got, want in
                             zip(jax.tree.leaves(grads), jax.tree.leaves(grads_f32))]
            for implementation, (_, grads) in results.items()}
  assert np.median(errors['matmul']) <= 1.5 * np.median(errors['xla']) + 1e-3
  assert max(errors['matmul']) <= 1.5 * max(errors['xla']) + 1e-3


def test_unknown_implementation_is_refused():
  config = synthetic.get_config('test').model
  config.cpu_conv = 'cudnn'
  with pytest.raises(ValueError, match='model.cpu_conv'):
    DUNet(config, 21, reconstruction=np.eye(config.output_stride ** 2 * 21, 16, dtype=np.float32), rngs=nnx.Rngs(0))
