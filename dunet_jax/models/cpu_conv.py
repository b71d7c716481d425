"""Convolutions as bf16 matmuls on CPU, so that bfloat16 reaches XLA:CPU's bf16 dot kernels.

XLA:CPU (jaxlib 0.10) computes a bfloat16 `convolution` in float32 (it converts the operands of
every convolution to float32), and so it does every bf16 dot whose result is bf16 or whose operands
are not both row-major (contracting dimension last on the left, first on the right). It also moves
bf16 data (pad, slice, concatenate, transpose) through float32: a concatenation of bf16 taps took
16 ms where the same bits as uint16 took 1.3 ms. Only a bf16 x bf16 -> float32 dot with row-major
operands runs in YNNPACK's bf16 kernels. No XLA:CPU flag of that release changes this.

So on CPU a k x k convolution (odd k, any dilation; at least MIN_CHANNELS input channels) is:
- width taps: the k horizontally shifted copies of the input (zero outside the image) side by side,
  (B, H, W, k*C), built on the uint16 bits of bf16 data;
- one dot of those rows with the kernel laid out as (k*C, k*O): column block i is kernel row i;
- the sum of the k float32 column blocks, block i shifted by (i - (k-1)/2) * dilation rows of the
  image (zero where that leaves the image), rounded once to the compute dtype.
Every output pixel is computed once (no padded grid). The backward pass (a custom VJP) keeps the
form: the input gradient is the same construction on the output gradient with the flipped,
transposed kernel (the transpose of a 'same' stride-1 convolution), and the kernel gradient is one
dot of the height-shifted output gradients, laid out transposed (k*O, B*H*W), with the width taps
saved from the forward pass. With a stride, the width taps are strided and the input rows are
split by phase (row % stride); each phase is one dot with the kernel rows that read it, and the
input gradient is scattered back by phase and tap. All dots of a training step take row-major
bf16 operands and return float32 (tested on the compiled program).

`conv2d(implementation='matmul')` picks this path at LOWERING time (`jax.lax.platform_dependent`),
so a program traced on a CPU host and lowered for TPU or GPU keeps XLA's convolution there, and
the parameters are the same either way. Float32 and grouped convolutions stay XLA's.
README, 'Train step on CPU', has the figures.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('matmul', 'xla')
# Narrower inputs (an RGB image) make dots too thin for the matmul units: XLA's convolution was faster.
MIN_CHANNELS = 16


def xla_conv(x: jax.Array, kernel: jax.Array, *, stride: int, dilation: int,
             groups: int) -> jax.Array:
  """NHWC x HWIO convolution with PyTorch's symmetric padding dilation * (k - 1) / 2."""
  pad = dilation * (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      rhs_dilation=(dilation, dilation), feature_group_count=groups,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _on_bits(move: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """move(x) computed on x's bits when x is bf16: XLA:CPU moves 16-bit integers as they are."""
  if x.dtype != jnp.bfloat16:
    return move(x)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
  return jax.lax.bitcast_convert_type(move(bits), jnp.bfloat16)


def _shift_rows(x: jax.Array, shift: int) -> jax.Array:
  """x[:, y + shift] along the height axis, zero where y + shift leaves the image."""
  if shift == 0:
    return x
  height = x.shape[1]
  pads = [(0, 0)] * x.ndim
  pads[1] = (max(-shift, 0), max(shift, 0))
  return jnp.pad(x, pads)[:, max(shift, 0):max(shift, 0) + height]


def _join(parts: list[jax.Array], axis: int) -> jax.Array:
  """jnp.concatenate; on integer bits as OR of zero-padded parts, which XLA:CPU fuses into one
  pass with the moves before it and the bitcast after it (a concatenate is a pass of its own)."""
  if len(parts) == 1:
    return parts[0]
  if not jnp.issubdtype(parts[0].dtype, jnp.integer):
    return jnp.concatenate(parts, axis=axis)
  axis = axis % parts[0].ndim
  total = sum(part.shape[axis] for part in parts)
  joined, start = None, 0
  for part in parts:
    pads = [(0, 0)] * part.ndim
    pads[axis] = (start, total - start - part.shape[axis])
    start += part.shape[axis]
    padded = jnp.pad(part, pads)
    joined = padded if joined is None else joined | padded
  return joined


def _width_taps(x: jax.Array, size: int, dilation: int) -> jax.Array:
  """(B, H, W, size*C): the size horizontally shifted copies of x (zero outside), side by side."""
  def move(x):
    half = (size - 1) // 2 * dilation
    width = x.shape[2]
    padded = jnp.pad(x, ((0, 0), (0, 0), (half, half), (0, 0)))
    return _join([padded[:, :, j * dilation:j * dilation + width] for j in range(size)], axis=-1)
  return x if size == 1 else _on_bits(move, x)


def _same_conv(taps: jax.Array, kernel_blocks: jax.Array, size: int, dilation: int) -> jax.Array:
  """float32 stride-1 'same' convolution from the width taps and the kernel as (size*C, size*O)."""
  batch, height, width, _ = taps.shape
  out_channels = kernel_blocks.shape[1] // size
  blocks = jnp.dot(taps.reshape(batch * height * width, -1), kernel_blocks,
                   preferred_element_type=jnp.float32).reshape(batch, height, width, size, out_channels)
  half = (size - 1) // 2
  return sum(_shift_rows(blocks[:, :, :, i], (i - half) * dilation) for i in range(size))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Stride-1, ungrouped NHWC x HWIO 'same' convolution (odd square kernel) as one dot per pass.

  `kernel` may be float32 (a parameter): it is cast to x's dtype, and its gradient comes back in
  the kernel's dtype, accumulated in float32.
  """
  return _forward(x, kernel, dilation)[0]


def _forward(x, kernel, dilation):
  size, _, channels, out_channels = kernel.shape
  taps = _width_taps(x, size, dilation)
  # Laid out in float32 (the parameter's dtype) and then cast: XLA:CPU transposes bf16 slowly.
  blocks = kernel.transpose(1, 2, 0, 3).reshape(size * channels, size * out_channels).astype(x.dtype)
  return _same_conv(taps, blocks, size, dilation).astype(x.dtype), (taps, kernel)


def _backward(dilation, residuals, grad):
  taps, kernel = residuals
  size, _, channels, out_channels = kernel.shape
  half = (size - 1) // 2
  # Kernel gradient: row block i of (size*O, B*H*W) is the output gradient shifted up by kernel
  # row i's offset, transposed; one dot with the forward's width taps gives (size*O, size*C).
  def shifted_transposed(grad):
    return _join([jnp.moveaxis(_shift_rows(grad, -(i - half) * dilation), -1, 0)
                  for i in range(size)], axis=0).reshape(size * out_channels, -1)
  kernel_grad = jnp.dot(_on_bits(shifted_transposed, grad), taps.reshape(-1, size * channels),
                        preferred_element_type=jnp.float32)
  kernel_grad = kernel_grad.reshape(size, out_channels, size, channels).transpose(0, 2, 3, 1)
  # Input gradient: the 'same' convolution of the output gradient with the flipped kernel, its
  # input and output channels swapped.
  flipped = kernel[::-1, ::-1].transpose(1, 3, 0, 2)
  blocks = flipped.reshape(size * out_channels, size * channels).astype(grad.dtype)
  x_grad = _same_conv(_width_taps(grad, size, dilation), blocks, size, dilation)
  return x_grad.astype(grad.dtype), kernel_grad.astype(kernel.dtype)


matmul_conv.defvjp(_forward, _backward)


def _row_phases(size: int, stride: int, dilation: int) -> dict[int, list[tuple[int, int]]]:
  """Kernel row i reads input row stride * y + (i - half) * dilation for output row y, which is
  row y + shift of phase `row % stride`: {phase: [(i, shift), ...]}."""
  phases = {}
  for i in range(size):
    offset = (i - (size - 1) // 2) * dilation
    phases.setdefault(offset % stride, []).append((i, offset // stride))
  return phases


def _strided_width_taps(x: jax.Array, size: int, stride: int, dilation: int, out_width: int) -> jax.Array:
  """(B, H, out_width, size*C): input column stride * x + (j - half) * dilation for tap j."""
  def move(x):
    half = (size - 1) // 2 * dilation
    padded = jnp.pad(x, ((0, 0), (0, 0), (half, half), (0, 0)))
    end = stride * (out_width - 1) + 1
    return _join([padded[:, :, j * dilation:j * dilation + end:stride] for j in range(size)], axis=-1)
  return _on_bits(move, x)


def _phase_rows(taps: jax.Array, phase: int, stride: int, out_height: int) -> jax.Array:
  """Rows phase, phase + stride, ... of the taps, zero-padded to out_height rows."""
  def move(taps):
    rows = taps[:, phase::stride][:, :out_height]
    return jnp.pad(rows, ((0, 0), (0, out_height - rows.shape[1]), (0, 0), (0, 0)))
  return _on_bits(move, taps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def strided_matmul_conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
                        in_shape: tuple[int, ...]) -> jax.Array:
  """The convolution of matmul_conv with stride > 1 (in_shape = x.shape): the width taps are
  strided, and the input rows split by phase (row % stride), each phase one dot with the kernel
  rows that read it, so no output is computed that the stride drops."""
  return _strided_forward(x, kernel, stride, dilation, in_shape)[0]


def _strided_forward(x, kernel, stride, dilation, in_shape):
  size, _, channels, out_channels = kernel.shape
  _, height, width, _ = in_shape
  out_height, out_width = (height - 1) // stride + 1, (width - 1) // stride + 1
  taps = _strided_width_taps(x, size, stride, dilation, out_width)
  rows = {phase: _phase_rows(taps, phase, stride, out_height) for phase in _row_phases(size, stride, dilation)}
  y = 0.0
  for phase, kernel_rows in _row_phases(size, stride, dilation).items():
    blocks = jnp.concatenate([kernel[i] for i, _ in kernel_rows], axis=-1)  # (size, C, n * O)
    blocks = blocks.reshape(size * channels, -1).astype(x.dtype)
    product = jnp.dot(rows[phase].reshape(-1, size * channels), blocks, preferred_element_type=jnp.float32)
    product = product.reshape(*rows[phase].shape[:3], len(kernel_rows), out_channels)
    y = y + sum(_shift_rows(product[:, :, :, n], shift) for n, (_, shift) in enumerate(kernel_rows))
  return y.astype(x.dtype), (rows, kernel)


def _strided_backward(stride, dilation, in_shape, residuals, grad):
  rows, kernel = residuals
  size, _, channels, out_channels = kernel.shape
  batch, height, width, _ = in_shape
  out_height, out_width = grad.shape[1:3]
  kernel_grad = [None] * size
  taps_grad = jnp.zeros((batch, height, out_width, size * channels), jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  for phase, kernel_rows in _row_phases(size, stride, dilation).items():
    phase_rows = rows[phase].reshape(-1, size * channels)
    def shifted(grad, axis):
      return _join([jnp.moveaxis(_shift_rows(grad, -shift), -1, 0) if axis == 0 else
                    _shift_rows(grad, -shift) for _, shift in kernel_rows], axis=axis)
    # Kernel rows of this phase: (n*O, B*Ho*Wo) @ (B*Ho*Wo, size*C).
    transposed = _on_bits(lambda grad: shifted(grad, 0).reshape(len(kernel_rows) * out_channels, -1), grad)
    product = jnp.dot(transposed, phase_rows, preferred_element_type=jnp.float32)
    for n, (i, _) in enumerate(kernel_rows):
      kernel_grad[i] = product[n * out_channels:(n + 1) * out_channels].reshape(out_channels, size, channels)
    # The phase's rows of the taps' gradient: (B*Ho*Wo, n*O) @ (n*O, size*C), back to rows
    # phase, phase + stride, ... of the input.
    # (n*O, size*C) laid out by a transpose of the kernel that XLA cannot fold into the dot
    # (a folded transpose would make it a float32 dot).
    blocks = jnp.stack([kernel[i] for i, _ in kernel_rows]).transpose(0, 3, 1, 2)
    blocks = blocks.reshape(len(kernel_rows) * out_channels, size * channels).astype(grad.dtype)
    rows_grad = jnp.dot(_on_bits(lambda grad: shifted(grad, -1), grad).reshape(-1, len(kernel_rows) * out_channels),
                        blocks, preferred_element_type=jnp.float32).reshape(batch, out_height, out_width, -1)
    used = len(range(phase, height, stride))
    taps_grad = taps_grad + jax.lax.pad(rows_grad[:, :used], zero, [
        (0, 0, 0), (phase, height - phase - stride * (used - 1) - 1, stride - 1), (0, 0, 0), (0, 0, 0)])
  # Each width tap j back to input columns stride * x + (j - half) * dilation.
  half = (size - 1) // 2 * dilation
  padded_width = width + 2 * half
  x_grad = 0.0
  for j in range(size):
    start = j * dilation
    x_grad = x_grad + jax.lax.pad(taps_grad[..., j * channels:(j + 1) * channels], zero, [
        (0, 0, 0), (0, 0, 0), (start, padded_width - start - stride * (out_width - 1) - 1, stride - 1), (0, 0, 0)])
  x_grad = x_grad[:, :, half:half + width]
  kernel_grad = jnp.stack(kernel_grad).transpose(0, 2, 3, 1)  # (size, O, size, C) -> HWIO
  return x_grad.astype(grad.dtype), kernel_grad.astype(kernel.dtype)


strided_matmul_conv.defvjp(_strided_forward, _strided_backward)


def _einsum_1x1(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return jnp.einsum('bhwi,io->bhwo', x[:, ::stride, ::stride], kernel[0, 0].astype(x.dtype))


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1, groups: int = 1,
           implementation: str = 'matmul') -> jax.Array:
  """NHWC convolution, symmetric padding; `kernel` (HWIO) is cast to x's dtype.

  implementation: 'matmul' = matmul_conv / strided_matmul_conv for a bf16 convolution they cover
  (ungrouped, odd square kernel, at least MIN_CHANNELS input channels) when the program is lowered
  for CPU, XLA's convolution elsewhere (in float32 XLA:CPU's own convolutions were as fast);
  'xla' = XLA everywhere. XLA's form of a 1x1 convolution is an einsum over the strided input.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.cpu_conv={implementation!r}: use one of {IMPLEMENTATIONS}')
  size = kernel.shape[0]
  def accelerator(x, kernel):
    if size == 1 and groups == 1:
      return _einsum_1x1(x, kernel, stride)
    return xla_conv(x, kernel.astype(x.dtype), stride=stride, dilation=dilation, groups=groups)
  covered = (x.dtype == jnp.bfloat16 and groups == 1 and kernel.shape[1] == size and size % 2 == 1
             and x.shape[-1] >= MIN_CHANNELS)
  if implementation == 'xla' or not covered:
    return accelerator(x, kernel)
  def cpu(x, kernel):
    if stride == 1:
      return matmul_conv(x, kernel, dilation)
    return strided_matmul_conv(x, kernel, stride, dilation, x.shape)
  return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=accelerator)
