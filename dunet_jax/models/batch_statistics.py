"""Training-mode batch normalization (batch statistics), with a lean gradient on CPU.

The arithmetic is flax's (nnx.BatchNorm with float32 dtype): float32 mean and E[x^2] - mean^2
variance clipped at 0, y = (x - mean) * (rsqrt(var + eps) * scale) + bias, cast to x's dtype.
Differentiated by JAX, that keeps x - mean as a float32 array for the backward pass and reads it
back; on XLA:CPU, where the step is bound by memory traffic around the bf16 matmuls, the CPU
version's custom gradient needs only x (as it came, e.g. bf16) and two per-channel sums:
  d bias = sum g,  d scale = sum g x_hat,  dx = scale r (g - mean g - x_hat mean(g x_hat)),
with r = rsqrt(var + eps) and x_hat = (x - mean) r (plus the terms of any gradient reaching the
returned mean and variance). Accelerators keep JAX's gradient; the choice is made at lowering time
(`jax.lax.platform_dependent`).
"""
import functools

import jax
import jax.numpy as jnp

AXES = (0, 1, 2)  # NHWC: statistics per channel


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  wide = x.astype(jnp.float32)
  mean = wide.mean(AXES)
  return mean, jnp.maximum(0.0, (wide * wide).mean(AXES) - mean * mean)


def _normalize(x, scale, bias, epsilon):
  mean, var = _statistics(x)
  multiplier = jax.lax.rsqrt(var + epsilon) * scale
  y = (x.astype(jnp.float32) - mean) * multiplier + bias
  return y.astype(x.dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_normalize(x, scale, bias, epsilon):
  return _normalize(x, scale, bias, epsilon)


def _cpu_forward(x, scale, bias, epsilon):
  y, mean, var = _normalize(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, var)


def _cpu_backward(epsilon, residuals, cotangents):
  x, scale, mean, var = residuals
  grad, mean_grad, var_grad = cotangents
  count = x.size // x.shape[-1]
  wide = x.astype(jnp.float32)
  grad = grad.astype(jnp.float32)
  inverse = jax.lax.rsqrt(var + epsilon)
  grad_sum = grad.sum(AXES)
  grad_x_sum = (grad * wide).sum(AXES)
  scale_grad = inverse * (grad_x_sum - mean * grad_sum)  # sum g x_hat
  centred = wide - mean
  x_grad = scale * inverse * (grad - grad_sum / count - centred * (inverse * scale_grad / count))
  x_grad = x_grad + mean_grad / count + var_grad * (2.0 / count) * centred
  return x_grad.astype(x.dtype), scale_grad, grad_sum


_cpu_normalize.defvjp(_cpu_forward, _cpu_backward)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array,
              epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(normalized x in x's dtype, float32 batch mean, float32 batch variance) of an NHWC batch."""
  return jax.lax.platform_dependent(
      x, scale, bias, cpu=lambda x, scale, bias: _cpu_normalize(x, scale, bias, epsilon),
      default=lambda x, scale, bias: _normalize(x, scale, bias, epsilon))
