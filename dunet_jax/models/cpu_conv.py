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
import math
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


def _row_phases(size: int, stride: int, dilation: int) -> dict[int, list[tuple[int, int]]]:
  """Kernel row i reads input row stride * y + (i - half) * dilation for output row y, which is
  row y + shift of phase `row % stride`: {phase: [(i, shift), ...]} (stride 1: one phase, all rows)."""
  phases = {}
  for i in range(size):
    offset = (i - (size - 1) // 2) * dilation
    phases.setdefault(offset % stride, []).append((i, offset // stride))
  return phases


def _width_taps(x: jax.Array, size: int, stride: int, dilation: int, out_width: int) -> jax.Array:
  """(B, H, out_width, size*C): input column stride * x + (j - half) * dilation for tap j (zero
  outside the image), the size taps side by side."""
  if size == 1 and stride == 1:
    return x
  def move(x):
    half = (size - 1) // 2 * dilation
    padded = jnp.pad(x, ((0, 0), (0, 0), (half, half), (0, 0)))
    end = stride * (out_width - 1) + 1
    return _join([padded[:, :, j * dilation:j * dilation + end:stride] for j in range(size)], axis=-1)
  return _on_bits(move, x)


def _kernel_blocks(kernel: jax.Array, kernel_rows: list[tuple[int, int]], dtype) -> jax.Array:
  """(size*C, n*O): column block n is kernel row kernel_rows[n][0] with its taps stacked, laid out
  in float32 (the parameter's dtype) and then cast: XLA:CPU moves bf16 slowly."""
  blocks = jnp.concatenate([kernel[i] for i, _ in kernel_rows], axis=-1)  # (size, C, n * O)
  return blocks.reshape(kernel.shape[0] * kernel.shape[2], -1).astype(dtype)


def _shifted_sum(taps: jax.Array, blocks: jax.Array, kernel_rows: list[tuple[int, int]]) -> jax.Array:
  """float32 sum over n of (taps @ column block n of `blocks`) shifted by kernel_rows[n]'s shift rows."""
  batch, height, width, _ = taps.shape
  product = jnp.dot(taps.reshape(batch * height * width, -1), blocks, preferred_element_type=jnp.float32)
  product = product.reshape(batch, height, width, len(kernel_rows), -1)
  return sum(_shift_rows(product[:, :, :, n], shift) for n, (_, shift) in enumerate(kernel_rows))


def _shifted_gradients(grad: jax.Array, kernel_rows: list[tuple[int, int]], transposed: bool) -> jax.Array:
  """The output gradient shifted back by each kernel row's shift, side by side: (B*H*W, n*O), or
  (n*O, B*H*W) when `transposed` (laid out so, on the bits, not by a transpose XLA would fold into
  the dot and turn float32)."""
  pixels = math.prod(grad.shape[:-1])
  def move(grad):
    shifted = [_shift_rows(grad, -shift) for _, shift in kernel_rows]
    if transposed:
      return _join([jnp.moveaxis(part, -1, 0) for part in shifted], axis=0).reshape(-1, pixels)
    return _join(shifted, axis=-1).reshape(pixels, -1)
  return _on_bits(move, grad)


def _spread(x: jax.Array, axis: int, start: int, length: int, stride: int) -> jax.Array:
  """x placed at positions start, start + stride, ... of an axis `length` long, zeros elsewhere."""
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (start, length - start - stride * (x.shape[axis] - 1) - 1, stride - 1)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Stride-1, ungrouped NHWC x HWIO 'same' convolution (odd square kernel) as one dot per pass.

  `kernel` may be float32 (a parameter): it is cast to x's dtype, and its gradient comes back in
  the kernel's dtype, accumulated in float32.
  """
  return _forward(x, kernel, dilation)[0]


def _forward(x, kernel, dilation):
  size = kernel.shape[0]
  kernel_rows = _row_phases(size, 1, dilation)[0]
  taps = _width_taps(x, size, 1, dilation, x.shape[2])
  y = _shifted_sum(taps, _kernel_blocks(kernel, kernel_rows, x.dtype), kernel_rows)
  return y.astype(x.dtype), (taps, kernel)


def _backward(dilation, residuals, grad):
  taps, kernel = residuals
  size, _, channels, out_channels = kernel.shape
  kernel_rows = _row_phases(size, 1, dilation)[0]
  # Kernel gradient: the shifted output gradients, transposed, (size*O, B*H*W) @ the forward's width
  # taps (B*H*W, size*C).
  kernel_grad = jnp.dot(_shifted_gradients(grad, kernel_rows, transposed=True),
                        taps.reshape(-1, size * channels), preferred_element_type=jnp.float32)
  kernel_grad = kernel_grad.reshape(size, out_channels, size, channels).transpose(0, 2, 3, 1)
  # Input gradient: the 'same' convolution of the output gradient with the flipped kernel, its
  # input and output channels swapped.
  flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
  taps_grad = _width_taps(grad, size, 1, dilation, grad.shape[2])
  x_grad = _shifted_sum(taps_grad, _kernel_blocks(flipped, kernel_rows, grad.dtype), kernel_rows)
  return x_grad.astype(grad.dtype), kernel_grad.astype(kernel.dtype)


matmul_conv.defvjp(_forward, _backward)


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
  _, height, width, _ = in_shape
  out_height, out_width = (height - 1) // stride + 1, (width - 1) // stride + 1
  taps = _width_taps(x, kernel.shape[0], stride, dilation, out_width)
  phases = _row_phases(kernel.shape[0], stride, dilation)
  rows = {phase: _phase_rows(taps, phase, stride, out_height) for phase in phases}
  y = sum(_shifted_sum(rows[phase], _kernel_blocks(kernel, kernel_rows, x.dtype), kernel_rows)
          for phase, kernel_rows in phases.items())
  return y.astype(x.dtype), (rows, kernel)


def _strided_backward(stride, dilation, in_shape, residuals, grad):
  rows, kernel = residuals
  size, _, channels, out_channels = kernel.shape
  batch, height, width, _ = in_shape
  out_height, out_width = grad.shape[1:3]
  kernel_grad = [None] * size
  taps_grad = 0.0
  for phase, kernel_rows in _row_phases(size, stride, dilation).items():
    # Kernel rows of this phase: (n*O, B*Ho*Wo) @ (B*Ho*Wo, size*C).
    product = jnp.dot(_shifted_gradients(grad, kernel_rows, transposed=True),
                      rows[phase].reshape(-1, size * channels), preferred_element_type=jnp.float32)
    for n, (i, _) in enumerate(kernel_rows):
      kernel_grad[i] = product[n * out_channels:(n + 1) * out_channels].reshape(out_channels, size, channels)
    # The phase's rows of the taps' gradient: (B*Ho*Wo, n*O) @ (n*O, size*C), back to rows
    # phase, phase + stride, ... of the input. The (n*O, size*C) kernel is laid out by a transpose
    # that XLA cannot fold into the dot (a folded transpose would make it a float32 dot).
    blocks = jnp.stack([kernel[i] for i, _ in kernel_rows]).transpose(0, 3, 1, 2)
    blocks = blocks.reshape(len(kernel_rows) * out_channels, size * channels).astype(grad.dtype)
    rows_grad = jnp.dot(_shifted_gradients(grad, kernel_rows, transposed=False), blocks,
                        preferred_element_type=jnp.float32).reshape(batch, out_height, out_width, -1)
    used = len(range(phase, height, stride))
    taps_grad = taps_grad + _spread(rows_grad[:, :used], 1, phase, height, stride)
  # Each width tap j back to input columns stride * x + (j - half) * dilation.
  half = (size - 1) // 2 * dilation
  x_grad = sum(_spread(taps_grad[..., j * channels:(j + 1) * channels], 2, j * dilation, width + 2 * half, stride)
               for j in range(size))
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
