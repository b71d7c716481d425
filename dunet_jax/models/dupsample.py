"""DUpsample: data-dependent upsampling by the label-reconstruction matrix W (paper Sec. 3.1).

A per-pixel linear map of the C'-dim code by W (N x C', N = r*r*C) followed by depth-to-space
with the repository's window flattening: output channel (i*r + j)*C + c of the code at (a, b)
becomes class c at pixel (a*r + i, b*r + j). Written as einsum + reshape, never a conv, and
correct for non-square maps. The logits are divided by a learnable temperature T (softmax(z/T),
Sec. 3.2) parameterised as log T so that T stays positive whatever the optimizer does.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Reconstruction(nnx.Variable):
  """W fitted from the labels: a variable the optimizer (which only sees nnx.Param) leaves alone."""


def depth_to_space(x: jax.Array, ratio: int, num_classes: int) -> jax.Array:
  """(B, h, w, r*r*C) -> (B, h*r, w*r, C), channel (i*r + j)*C + c -> pixel (a*r+i, b*r+j), class c."""
  batch, height, width, channels = x.shape
  if channels != ratio * ratio * num_classes:
    raise ValueError(f'depth_to_space: {channels} channels != {ratio}^2 * {num_classes}')
  x = x.reshape(batch, height, width, ratio, ratio, num_classes)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height * ratio, width * ratio, num_classes)


class DUpsample(nnx.Module):
  """Codes (B, h, w, C') -> float32 logits / T (B, h*r, w*r, C)."""

  def __init__(self, num_components: int, num_classes: int, ratio: int,
               reconstruction: np.ndarray | None, *, train_w: bool = False,
               temperature_init: float = 1.0, dtype=jnp.float32):
    shape = (ratio * ratio * num_classes, num_components)
    if reconstruction is None:
      w = np.zeros(shape, np.float32)  # placeholder: the trainer fits W, restore overwrites it
    else:
      w = np.asarray(reconstruction, np.float32)
      if w.shape != shape:
        raise ValueError(
            f'reconstruction W has shape {w.shape} but the model needs {shape} '
            f'(ratio={ratio} from model.output_stride, num_classes={num_classes}, '
            f'num_components={num_components} from model.num_components): refit W for this config')
    if temperature_init <= 0:
      raise ValueError(f'model.temperature_init must be > 0, got {temperature_init}')
    self.ratio = ratio
    self.num_classes = num_classes
    self.dtype = dtype
    self.w = (nnx.Param if train_w else Reconstruction)(jnp.asarray(w))
    self.log_temperature = nnx.Param(jnp.asarray(np.log(temperature_init), jnp.float32))

  def temperature(self) -> jax.Array:
    return jnp.exp(self.log_temperature[...])

  def __call__(self, codes: jax.Array) -> jax.Array:
    w = self.w[...].astype(self.dtype)
    logits = jnp.einsum('bhwk,nk->bhwn', codes.astype(self.dtype), w,
                        preferred_element_type=jnp.float32)
    logits = depth_to_space(logits, self.ratio, self.num_classes)
    return logits / self.temperature()
