"""DUpsample against brute-force loops over the window flattening, and a numpy-PCA round trip."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dunet_jax.models.dupsample import DUpsample, Reconstruction, depth_to_space


def test_depth_to_space_matches_brute_force_on_non_square():
  ratio, classes, height, width = 3, 4, 2, 5
  x = np.random.RandomState(0).randn(2, height, width, ratio * ratio * classes).astype(np.float32)
  expected = np.zeros((2, height * ratio, width * ratio, classes), np.float32)
  for a in range(height):
    for b in range(width):
      for i in range(ratio):
        for j in range(ratio):
          for c in range(classes):
            expected[:, a * ratio + i, b * ratio + j, c] = x[:, a, b, (i * ratio + j) * classes + c]
  np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(x), ratio, classes)), expected)


def test_dupsample_is_projection_then_window_placement_over_temperature():
  ratio, classes, components, height, width = 2, 3, 5, 3, 4
  rng = np.random.RandomState(1)
  w = rng.randn(ratio * ratio * classes, components).astype(np.float32)
  codes = rng.randn(1, height, width, components).astype(np.float32)
  layer = DUpsample(components, classes, ratio, w, temperature_init=2.0)
  expected = np.zeros((1, height * ratio, width * ratio, classes), np.float32)
  for a in range(height):
    for b in range(width):
      v = w @ codes[0, a, b]
      for i in range(ratio):
        for j in range(ratio):
          for c in range(classes):
            expected[0, a * ratio + i, b * ratio + j, c] = v[(i * ratio + j) * classes + c] / 2.0
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(codes))), expected, rtol=1e-5, atol=1e-5)


def _blocky_labels(rng: np.random.RandomState, height: int, width: int, classes: int) -> np.ndarray:
  labels = np.zeros((height, width), np.uint8)
  for _ in range(6):
    top, left = rng.randint(0, height - 4), rng.randint(0, width - 4)
    bottom, right = top + rng.randint(4, height // 2), left + rng.randint(4, width // 2)
    labels[top:bottom, left:right] = rng.randint(classes)
  labels[rng.rand(height, width) < 0.02] = 255  # void pixels: one-hot all zeros, never scored
  return labels


def _one_hot_windows(labels: np.ndarray, ratio: int, classes: int) -> np.ndarray:
  """(num_windows, r*r*C) with entry (i*r + j)*C + c, written as loops (the convention itself)."""
  height, width = labels.shape
  windows = []
  for a in range(height // ratio):
    for b in range(width // ratio):
      v = np.zeros(ratio * ratio * classes, np.float32)
      for i in range(ratio):
        for j in range(ratio):
          label = labels[a * ratio + i, b * ratio + j]
          if label != 255:
            v[(i * ratio + j) * classes + label] = 1
      windows.append(v)
  return np.stack(windows)


def test_pca_codes_reconstruct_non_square_labels():
  ratio, classes, components = 8, 4, 64
  rng = np.random.RandomState(2)
  maps = [_blocky_labels(rng, 48, 80, classes), _blocky_labels(rng, 64, 40, classes)]
  windows = np.concatenate([_one_hot_windows(m, ratio, classes) for m in maps])
  eigenvalues, eigenvectors = np.linalg.eigh(windows.T @ windows)
  w = eigenvectors[:, np.argsort(eigenvalues)[::-1][:components]].astype(np.float32)
  layer = DUpsample(components, classes, ratio, w)
  for labels in maps:
    codes = _one_hot_windows(labels, ratio, classes) @ w
    codes = codes.reshape(1, labels.shape[0] // ratio, labels.shape[1] // ratio, components)
    predicted = np.asarray(layer(jnp.asarray(codes)))[0].argmax(-1)
    valid = labels != 255
    assert (predicted[valid] == labels[valid]).mean() > 0.999


def test_w_is_fixed_unless_train_w_and_temperature_stays_positive():
  w = np.zeros((2 * 2 * 3, 4), np.float32)
  fixed = DUpsample(4, 3, 2, w)
  trained = DUpsample(4, 3, 2, w, train_w=True)
  assert isinstance(fixed.w, Reconstruction) and not isinstance(fixed.w, nnx.Param)
  assert isinstance(trained.w, nnx.Param)
  assert len(nnx.state(fixed, nnx.Param)) == 1  # only log T
  fixed.log_temperature[...] = jnp.asarray(-50.0)
  assert float(fixed.temperature()) > 0


def test_wrong_w_shape_is_a_clear_error():
  with pytest.raises(ValueError, match='num_components'):
    DUpsample(8, 3, 2, np.zeros((12, 4), np.float32))
