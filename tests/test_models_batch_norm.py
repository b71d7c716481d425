"""BatchNorm in bfloat16 models: statistics and normalisation stay float32, in training and at eval."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dunet_jax.models import layers


def _bn(mean, var) -> layers.BatchNorm:
  bn = layers.batch_norm(len(mean), jnp.bfloat16, nnx.Rngs(0))
  bn.mean[...] = jnp.asarray(mean, jnp.float32)
  bn.var[...] = jnp.asarray(var, jnp.float32)
  return bn


def test_eval_normalises_with_float32_running_statistics():
  # Running means that bfloat16 cannot hold (its spacing is 4 near 1000, 2**-7 near 1): flax's own
  # BatchNorm with dtype=bfloat16 promotes them to bf16 and gives 0 or 4 instead of 2.5 here.
  mean, var = np.array([1021.5, 0.30078125, -3.1], np.float32), np.array([1.0, 1e-4, 7.3], np.float32)
  bn = _bn(mean, var)
  bn.eval()
  x = jnp.asarray([[[[1024.0, 0.3, 2.0]]]], jnp.bfloat16)  # exactly representable inputs
  y = jax.jit(lambda x: bn(x))(x)
  assert y.dtype == jnp.bfloat16
  expected = (np.asarray(x, np.float64) - mean) / np.sqrt(var.astype(np.float64) + layers.BN_EPSILON)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2 ** -8)
  assert bn.mean[...].dtype == bn.var[...].dtype == jnp.float32


def test_training_updates_float32_statistics_from_the_batch():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(500.0, 3.0, (4, 5, 6, 2)), jnp.bfloat16)
  bn = _bn(np.zeros(2, np.float32), np.ones(2, np.float32))
  bn.train()
  y = nnx.jit(lambda bn, x: bn(x))(bn, x)
  batch = np.asarray(x, np.float64).reshape(-1, 2)
  expected = (batch - batch.mean(0)) / np.sqrt(batch.var(0) + layers.BN_EPSILON)
  np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, 2), expected, atol=2 ** -6)
  assert bn.mean[...].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * batch.mean(0), rtol=1e-6)
