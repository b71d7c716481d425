"""Stride-1 convolutions as shifted matmuls, so that bfloat16 reaches XLA:CPU's bf16 dot kernels.

XLA:CPU (jaxlib 0.10) computes a bfloat16 `convolution` in float32: it converts the operands of
every convolution to float32, and those of every dot whose operands are not both row-major
(contracting dimension last on the left, first on the right); no XLA:CPU flag of that release
changes this (the YNNPACK fusion types and the oneDNN options leave the convolution float32). A
bf16 x bf16 -> f32 dot with row-major operands runs in YNNPACK's bf16 kernels instead.

Here a k x k convolution (any dilation, stride 1) is k*k such dots. The zero-padded images are
flattened to rows of (batch * padded height * padded width, channels), followed by as many zero
rows as the last tap's offset, so that moving the window by (i, j) taps is a contiguous slice of
rows starting at i * dilation * padded_width + j * dilation; the output is computed on the whole
padded grid (also across image boundaries) and the rows outside the images are dropped. The
backward pass (a custom VJP) keeps the form: the input gradient is k*k dots of the row-shifted
output gradient with the transposed taps, and the kernel gradient is k*k dots of the transposed
output gradient with the same input slices. That transposed operand is written by padding the
transposed NHWC gradient: a plain transpose of its rows is folded into the dot by XLA, leaving a
dot that contracts its operands' major dimension, which XLA:CPU then upcasts to float32. So all
k*k * 3 dots of a training step run in bf16 (tested on the compiled program).

The cost beyond the dots is memory traffic: each tap's slice is copied, and the k*k float32
partial products are summed. That pays for wide convolutions (256 channels and up) and not for
narrow ones (64 channels at high resolution), where XLA's float32 convolution is faster; see the
README for the figures on this project's CPU (AMD EPYC, AVX-512 BF16, no AMX).

With model.cpu_conv='matmul', `conv2d` picks this path at LOWERING time
(`jax.lax.platform_dependent`), so a program traced on a CPU host and lowered for TPU or GPU keeps
XLA's convolution there. The default is 'xla'.
"""
import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'matmul')


def xla_conv(x: jax.Array, kernel: jax.Array, *, stride: int, dilation: int,
             groups: int) -> jax.Array:
  """NHWC x HWIO convolution with PyTorch's symmetric padding dilation * (k - 1) / 2."""
  pad = dilation * (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      rhs_dilation=(dilation, dilation), feature_group_count=groups,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _geometry(shape: tuple[int, ...], size: int, dilation: int):
  batch, height, width, _ = shape
  pad = dilation * (size - 1) // 2
  padded_width = width + 2 * pad
  rows = batch * (height + 2 * pad) * padded_width  # the padded images' pixels, one row each
  offsets = [i * dilation * padded_width + j * dilation for i in range(size) for j in range(size)]
  return pad, padded_width, offsets, rows


def _unrows(y: jax.Array, shape: tuple[int, ...], pad: int, padded_width: int, start: int) -> jax.Array:
  """(rows, C) on the padded grid -> NHWC: the height x width window whose corner is at (start, start)."""
  batch, height, width, _ = shape
  y = y.reshape(batch, height + 2 * pad, padded_width, -1)
  return y[:, start:start + height, start:start + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shifted_matmul_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Stride-1, ungrouped NHWC x HWIO convolution (odd square kernel) as k*k row-shifted matmuls.

  `kernel` may be float32 (a parameter): it is cast to x's dtype, and its gradient comes back in
  the kernel's dtype, accumulated in float32.
  """
  return _forward(x, kernel, dilation)[0]


def _forward(x, kernel, dilation):
  size = kernel.shape[0]
  pad, padded_width, offsets, rows = _geometry(x.shape, size, dilation)
  # `offsets[-1]` zero rows after the last image, so that every tap's slice has `rows` rows.
  flat = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).reshape(rows, x.shape[-1])
  flat = jnp.pad(flat, ((0, offsets[-1]), (0, 0)))
  taps = kernel.astype(x.dtype).reshape(size * size, x.shape[-1], -1)
  y = sum(jnp.dot(flat[offset:offset + rows], taps[t], preferred_element_type=jnp.float32)
          for t, offset in enumerate(offsets))
  return _unrows(y.astype(x.dtype), x.shape, pad, padded_width, 0), (flat, kernel)


def _backward(dilation, residuals, grad):
  flat, kernel = residuals
  size = kernel.shape[0]
  batch, height, width, out_channels = grad.shape
  channels = flat.shape[-1]
  shape = (batch, height, width, channels)
  pad, padded_width, offsets, rows = _geometry(shape, size, dilation)
  # The output gradient on the forward's row grid (zero on the rows the forward dropped), each
  # shifted back by its tap: the input gradient is k*k dots with the transposed taps.
  grad_rows = jnp.pad(grad, ((0, 0), (0, 2 * pad), (0, padded_width - width), (0, 0)))
  grad_rows = jnp.pad(grad_rows.reshape(rows, out_channels), ((offsets[-1], 0), (0, 0)))
  taps_t = jnp.swapaxes(kernel.astype(grad.dtype).reshape(size * size, channels, out_channels), 1, 2)
  dx = sum(jnp.dot(grad_rows[offsets[-1] - offset:offsets[-1] - offset + rows], taps_t[t],
                   preferred_element_type=jnp.float32) for t, offset in enumerate(offsets))
  dx = _unrows(dx, shape, pad, padded_width, pad)
  # The kernel gradient is (output gradient)^T @ (input slice) per tap. Transposed by the pad of the
  # NHWC gradient (not by `.T` of its rows, which XLA folds into the dot, leaving a dot that
  # contracts its operands' major dimension and that XLA:CPU computes in float32), the left
  # operand is row-major and the dots run in the bf16 kernels.
  grad_t = jnp.pad(jnp.transpose(grad, (3, 0, 1, 2)),
                   ((0, 0), (0, 0), (0, 2 * pad), (0, padded_width - width))).reshape(out_channels, rows)
  dkernel = jnp.stack([jnp.dot(grad_t, flat[offset:offset + rows], preferred_element_type=jnp.float32)
                       for offset in offsets])
  dkernel = jnp.swapaxes(dkernel, 1, 2).reshape(kernel.shape)
  return dx.astype(grad.dtype), dkernel.astype(kernel.dtype)


shifted_matmul_conv.defvjp(_forward, _backward)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1, groups: int = 1,
           implementation: str = 'xla') -> jax.Array:
  """NHWC convolution, symmetric padding; `kernel` (HWIO) is cast to x's dtype.

  implementation: 'xla' = XLA's convolution; 'matmul' = shifted matmuls where they apply (stride 1,
  no groups, odd square kernel) when the program is lowered for CPU, XLA's convolution otherwise.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.cpu_conv={implementation!r}: use one of {IMPLEMENTATIONS}')
  def accelerator(x, kernel):
    return xla_conv(x, kernel.astype(x.dtype), stride=stride, dilation=dilation, groups=groups)
  size = kernel.shape[0]
  if implementation == 'xla' or stride != 1 or groups != 1 or kernel.shape[1] != size or size % 2 == 0:
    return accelerator(x, kernel)
  return jax.lax.platform_dependent(
      x, kernel, cpu=lambda x, kernel: shifted_matmul_conv(x, kernel, dilation), default=accelerator)
