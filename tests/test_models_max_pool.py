"""The 3x3 stride-2 max pool against a brute-force loop, and where each implementation is lowered."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dunet_jax.models import max_pool


def _brute_force(x: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pooled output, and the input gradient with each output's gradient on the first maximum of
  its window in row-major order (PyTorch's MaxPool2d(3, 2, 1))."""
  batch, height, width, channels = x.shape
  out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  pooled = np.zeros((batch, out_height, out_width, channels), np.float64)
  x_grad = np.zeros(x.shape, np.float64)
  for b, y, z, c in np.ndindex(batch, out_height, out_width, channels):
    best = None
    for i in range(3):
      for j in range(3):
        row, col = 2 * y - 1 + i, 2 * z - 1 + j
        if 0 <= row < height and 0 <= col < width and (best is None or x[b, row, col, c] > x[b, *best, c]):
          best = (row, col)
    pooled[b, y, z, c] = x[b, *best, c]
    x_grad[b, *best, c] += grad[b, y, z, c]
  return pooled, x_grad


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape', [(2, 9, 7, 3), (1, 10, 12, 2)])
def test_max_pool_and_its_gradient_match_a_brute_force_loop(shape, dtype):
  rng = np.random.default_rng(shape[1])
  # Three values (and negatives): most windows hold ties, where the first maximum must win.
  x = rng.integers(-2, 1, shape).astype(np.float32)
  out_shape = (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
  grad = rng.integers(1, 8, out_shape).astype(np.float32)  # exact in bf16, sums exact in float32
  want_pooled, want_grad = _brute_force(x, grad)
  pooled, vjp = jax.vjp(jax.jit(max_pool.max_pool), jnp.asarray(x, dtype))
  (x_grad,) = vjp(jnp.asarray(grad, dtype))
  assert pooled.dtype == x_grad.dtype == dtype
  np.testing.assert_array_equal(np.asarray(pooled, np.float64), want_pooled)
  np.testing.assert_array_equal(np.asarray(x_grad, np.float64), want_grad)


def _lowered_gradient(platform: str) -> str:
  x = jnp.zeros((1, 8, 8, 4), jnp.bfloat16)
  gradient = jax.grad(lambda x: jnp.sum(max_pool.max_pool(x).astype(jnp.float32)))
  return jax.jit(gradient).trace(x).lower(lowering_platforms=(platform,)).as_text()


def test_accelerators_keep_xla_select_and_scatter():
  assert 'select_and_scatter' not in _lowered_gradient('cpu')
  for platform in ('tpu', 'cuda'):  # traced on this CPU host, lowered for an accelerator
    assert 'select_and_scatter' in _lowered_gradient(platform), platform
