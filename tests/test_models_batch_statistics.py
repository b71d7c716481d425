"""Training-mode BatchNorm: the CPU gradient against JAX's, and the layer against nnx.BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dunet_jax.models import batch_statistics
from dunet_jax.models.layers import BatchNorm


def test_cpu_gradient_equals_jax_gradient_of_the_same_arithmetic():
  rng = np.random.default_rng(0)
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((2, 5, 7, 4)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(4), jnp.float32)
  # Cotangents for all three outputs: the mean and variance ones cover any use of them.
  cotangents = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                jnp.asarray(rng.standard_normal(4), jnp.float32), jnp.asarray(rng.standard_normal(4), jnp.float32))
  with jax.default_matmul_precision('highest'):
    outputs, cpu_vjp = jax.vjp(lambda *a: batch_statistics._cpu_normalize(*a, 1e-5), x, scale, bias)
    want_outputs, jax_vjp = jax.vjp(lambda *a: batch_statistics._normalize(*a, 1e-5), x, scale, bias)
  for got, want in zip(outputs, want_outputs):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(cpu_vjp(cotangents), jax_vjp(cotangents)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_training_layer_matches_nnx_batch_norm(dtype):
  rng = np.random.default_rng(1)
  x = jnp.asarray(1.0 + rng.standard_normal((2, 6, 5, 8)), dtype)
  ours = BatchNorm(8, compute_dtype=dtype, epsilon=1e-5, rngs=nnx.Rngs(0))
  reference = nnx.BatchNorm(8, momentum=ours.momentum, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  for layer in (ours, reference):
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
  reference.scale[...], reference.bias[...] = ours.scale[...], ours.bias[...]
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(layer, x):
    return jnp.sum(layer(x).astype(jnp.float32) * weights)
  value, (layer_grad, x_grad) = nnx.value_and_grad(loss, argnums=(0, 1))(ours, x)
  want_value, (want_layer_grad, want_x_grad) = nnx.value_and_grad(loss, argnums=(0, 1))(reference, x)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(value, want_value, rtol=tolerance)
  assert x_grad.dtype == dtype
  scale = float(np.abs(np.asarray(want_x_grad, np.float32)).max())
  np.testing.assert_allclose(np.asarray(x_grad, np.float32), np.asarray(want_x_grad, np.float32),
                             atol=tolerance * scale)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(getattr(layer_grad, name)[...], getattr(want_layer_grad, name)[...],
                               rtol=tolerance, atol=tolerance)
  for name in ('mean', 'var'):  # running statistics, updated the same way
    np.testing.assert_allclose(getattr(ours, name)[...], getattr(reference, name)[...], rtol=1e-5, atol=1e-6)
