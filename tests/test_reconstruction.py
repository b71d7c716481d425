"""W fitting, compress / reconstruct and the W file, against brute-force numpy references."""
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dunet_jax import reconstruction, upper_bound
from dunet_jax.data import label_files
from dunet_jax.reconstruction import solvers
from helpers import REPO_ROOT

NUM_CLASSES = 21


def dense_windows(maps: list[np.ndarray], ratio: int, num_classes: int) -> np.ndarray:
  """One row per window (skipping all-void ones), built pixel by pixel: v[(i*r + j)*C + c]."""
  rows = []
  for label in maps:
    for a in range(label.shape[0] // ratio):
      for b in range(label.shape[1] // ratio):
        v = np.zeros(ratio * ratio * num_classes)
        for i in range(ratio):
          for j in range(ratio):
            value = int(label[a * ratio + i, b * ratio + j])
            if value < num_classes:
              v[(i * ratio + j) * num_classes + value] = 1
        if v.any():
          rows.append(v)
  return np.array(rows)


def pad(label: np.ndarray, ratio: int) -> np.ndarray:
  height, width = -(-label.shape[0] // ratio) * ratio, -(-label.shape[1] // ratio) * ratio
  padded = np.full((height, width), 255, np.uint8)
  padded[:label.shape[0], :label.shape[1]] = label
  return padded


@pytest.fixture(scope='module')
def real_maps(voc_labels_dir) -> list[np.ndarray]:
  """Non-square crops of real VOC train maps (with their void bands), 5 sizes."""
  ids = label_files.read_ids(voc_labels_dir / 'lists' / 'voc2012_train_1464.txt')[:5]
  maps = []
  for index, label_id in enumerate(ids):
    label = label_files.read_label(voc_labels_dir / 'SegmentationClass' / f'{label_id}.png')
    top = label.shape[0] // 2 - 40
    maps.append(label[top:top + 64 + 8 * (index % 3), 100:100 + 96 + 8 * index])
  return maps


def one_device_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))


def eight_device_mesh() -> Mesh:
  return jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def moments_of(maps, ratio, mesh=None, chunk_size=64, num_classes=NUM_CLASSES):
  return reconstruction.accumulate_moments(([pad(m, ratio)] for m in maps), ratio=ratio,
                                           num_classes=num_classes, mesh=mesh, chunk_size=chunk_size)


def test_second_moment_matches_dense_one_hot_windows(real_maps):
  moments = moments_of(real_maps, 8)
  x = dense_windows([pad(m, 8) for m in real_maps], 8, NUM_CLASSES)
  np.testing.assert_array_equal(moments.dense(), x.T @ x)
  assert moments.num_windows == x.shape[0]
  assert all(block.dtype == np.uint16 for block in moments.blocks.values())    # 2 bytes per count
  assert moments.num_mixed_windows > 50          # the structured paths were exercised
  probe = np.random.default_rng(0).standard_normal((x.shape[1], 5))
  np.testing.assert_allclose(moments.matmul(probe), x.T @ (x @ probe), rtol=1e-9, atol=1e-9)


def test_many_classes_per_window_and_void():
  """Random labels: windows with up to 16 classes (beyond the first classify pass) and void."""
  labels = np.random.default_rng(1).integers(0, 20, (2, 8, 12)).astype(np.uint8)
  labels[labels >= 17] = 255
  moments = reconstruction.accumulate_moments([labels], ratio=4, num_classes=17, chunk_size=16)
  x = dense_windows(list(labels), 4, 17)
  np.testing.assert_array_equal(moments.dense(), x.T @ x)


def test_block_counts_widen_before_they_overflow():
  """80,000 copies of one mixed window push counts of classes 0 and 1 past uint16 (65,535); class 2
  shares only 40 random windows with them. The moment stays exact and only the busy blocks widen."""
  same = np.tile(np.array([[0, 1], [0, 1]], np.uint8), (1, 80_000))
  rare = np.random.default_rng(0).choice(np.array([0, 1, 2, 255], np.uint8), (2, 80))
  labels = np.concatenate([same, rare], axis=1)[None]
  moments = reconstruction.accumulate_moments([labels], ratio=2, num_classes=3)
  x = dense_windows(list(labels), 2, 3)
  np.testing.assert_array_equal(moments.dense(), x.T @ x)
  assert moments.dense().max() > np.iinfo(np.uint16).max
  assert {pair: block.dtype for pair, block in moments.blocks.items() if 2 in pair} == {
      pair: np.uint16 for pair in [(0, 2), (1, 2), (2, 2)] if pair in moments.blocks}
  assert moments.blocks[(0, 1)].dtype == np.uint32
  probe = np.random.default_rng(1).standard_normal((x.shape[1], 3))
  np.testing.assert_allclose(moments.matmul(probe), x.T @ (x @ probe), rtol=1e-12)


def test_w_equals_numpy_eigh_up_to_sign(real_maps):
  fit = reconstruction.fit_pca(([pad(m, 8)] for m in real_maps), ratio=8, num_classes=NUM_CLASSES,
                               num_components=24, solver='exact')
  x = dense_windows([pad(m, 8) for m in real_maps], 8, NUM_CLASSES)
  values, vectors = np.linalg.eigh(x.T @ x)
  values, vectors = values[::-1], vectors[:, ::-1]
  gaps = np.minimum(values[:24] - values[1:25], np.concatenate([[np.inf], values[:23] - values[1:24]]))
  distinct = gaps > 1e-6 * values[0]
  assert distinct.sum() >= 12
  cosines = np.abs(np.sum(fit.w.astype(np.float64) * vectors[:, :24], axis=0))
  np.testing.assert_allclose(cosines[distinct], 1.0, atol=1e-5)
  np.testing.assert_allclose(fit.eigenvalues, values[:24] / x.shape[0], rtol=1e-5)
  largest = fit.w[np.argmax(np.abs(fit.w), axis=0), np.arange(24)]
  assert np.all(largest > 0)


def test_eight_devices_equal_one_device(real_maps):
  one = moments_of(real_maps, 8, one_device_mesh())
  eight = moments_of(real_maps, 8, eight_device_mesh())
  assert eight.num_windows == one.num_windows
  np.testing.assert_array_equal(eight.uniform_counts, one.uniform_counts)
  assert eight.blocks.keys() == one.blocks.keys()
  for pair, block in one.blocks.items():
    np.testing.assert_array_equal(eight.blocks[pair], block)
  w_one = reconstruction.solve_moments(one, 32, solver='exact').w
  w_eight = reconstruction.solve_moments(eight, 32, solver='exact').w
  np.testing.assert_allclose(w_eight, w_one, atol=1e-6)


def test_two_processes_sum_their_moments(voc_labels_dir, tmp_path, coordinator_address):
  """Two localhost processes (2 devices each), each reading half of 12 whole real maps, end with the
  moments of all 12 counted in one process."""
  ids = label_files.read_ids(voc_labels_dir / 'lists' / 'voc2012_train_1464.txt')[:12]
  maps = [pad(label_files.read_label(voc_labels_dir / 'SegmentationClass' / f'{i}.png'), 8) for i in ids]
  np.savez(tmp_path / 'maps.npz', **{f'{index:02d}': m for index, m in enumerate(maps)})
  env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}
  processes = [subprocess.Popen(
      [sys.executable, str(REPO_ROOT / 'tests' / 'two_process_moments.py'), str(tmp_path / 'maps.npz'),
       coordinator_address, str(index), str(tmp_path / 'moments.npz')],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
  for process in processes:
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
  expected = moments_of(maps, 8)
  with np.load(tmp_path / 'moments.npz') as got:
    assert int(got['num_windows']) == expected.num_windows
    assert int(got['num_mixed_windows']) == expected.num_mixed_windows > 0
    np.testing.assert_array_equal(got['uniform_counts'], expected.uniform_counts)
    np.testing.assert_array_equal(got['dense'], expected.dense())


def test_randomized_solver_agrees_with_exact(real_maps):
  moments = moments_of(real_maps, 8)
  exact = reconstruction.solve_moments(moments, 32, solver='exact')
  with warnings.catch_warnings():
    warnings.simplefilter('error')                              # converged: no warning
    randomized = reconstruction.solve_moments(moments, 32, solver='randomized')
  overlap = np.linalg.svd(exact.w.astype(np.float64).T @ randomized.w, compute_uv=False)
  assert overlap.min() > 0.999                                  # largest principal angle < 2.6 degrees
  np.testing.assert_allclose(randomized.eigenvalues, exact.eigenvalues, rtol=1e-5)


def test_auto_solver_is_exact_for_voc_up_to_r16():
  assert solvers.pick_solver(16 * 16 * 21) == 'exact'           # VOC at r = 16: N = 5,376
  assert solvers.pick_solver(8 * 8 * 60) == 'exact'
  assert solvers.pick_solver(32 * 32 * 21) == 'randomized'      # 21,504: the dense M would be 3.7 GB


def test_subspace_iteration_matches_numpy_eigh():
  """A PSD matrix with a spectrum like M's (fast decay, then a flat tail) and a clear gap at k."""
  rng = np.random.default_rng(0)
  size, count = 200, 8
  basis = np.linalg.qr(rng.standard_normal((size, size)))[0]
  spectrum = np.concatenate([1000.0 * 0.6 ** np.arange(count), 1e-2 * rng.uniform(0.5, 1.0, size - count)])
  matrix = (basis * spectrum) @ basis.T
  values, vectors, residual = solvers.subspace_iteration(lambda x: matrix @ x, size, count, oversample=count,
                                                         max_iters=200, tol=1e-6, seed=0)
  expected_values, expected_vectors = np.linalg.eigh(matrix)
  np.testing.assert_allclose(values, expected_values[::-1][:count], rtol=1e-9)
  cosines = np.abs(np.sum(vectors * expected_vectors[:, ::-1][:, :count], axis=0))
  np.testing.assert_allclose(cosines, 1.0, atol=1e-9)
  assert residual <= 1e-6


def test_unconverged_randomized_solve_warns(real_maps):
  moments = moments_of(real_maps, 8)
  with pytest.warns(RuntimeWarning, match=r"did not converge: after max_iters=2 .*solver='exact'"):
    reconstruction.solve_moments(moments, 32, solver='randomized', max_iters=2)


def test_round_trip_on_non_square_maps(real_maps):
  maps = [pad(m, 8) for m in real_maps]
  assert len({m.shape for m in maps}) > 3 and all(m.shape[0] != m.shape[1] for m in maps)
  fit = reconstruction.fit_pca(([m] for m in maps), ratio=8, num_classes=NUM_CLASSES,
                               num_components=128, solver='exact')
  correct = total = 0
  for label in maps:
    codes = upper_bound.compress(label[None], fit.w, 8, NUM_CLASSES)
    assert codes.shape == (1, label.shape[0] // 8, label.shape[1] // 8, 128)
    predicted = np.asarray(upper_bound.reconstruct(codes, fit.w, 8, NUM_CLASSES)).argmax(-1)[0]
    valid = label < NUM_CLASSES
    correct += np.sum(predicted[valid] == label[valid])
    total += valid.sum()
  assert correct / total > 0.999


def test_flattening_index_is_i_r_plus_j_times_c_plus_c():
  """compress / reconstruct against a pixel-by-pixel loop over (i*r + j)*C + c, non-square, with void."""
  ratio, num_classes, count = 4, 5, 7
  rng = np.random.default_rng(0)
  labels = rng.integers(0, num_classes, (2, 8, 12)).astype(np.uint8)
  labels[0, 1, 2] = labels[1, 7, 11] = 255
  w = rng.standard_normal((ratio * ratio * num_classes, count)).astype(np.float32)
  codes = np.asarray(upper_bound.compress(labels, w, ratio, num_classes))
  scores = np.asarray(upper_bound.reconstruct(codes, w, ratio, num_classes))
  expected_codes = np.zeros((2, 2, 3, count))
  expected_scores = np.zeros((2, 8, 12, num_classes))
  for b in range(2):
    for a in range(2):
      for c in range(3):
        for i in range(ratio):
          for j in range(ratio):
            value = int(labels[b, a * ratio + i, c * ratio + j])
            if value != 255:
              expected_codes[b, a, c] += w[(i * ratio + j) * num_classes + value]
        for i in range(ratio):
          for j in range(ratio):
            for k in range(num_classes):
              expected_scores[b, a * ratio + i, c * ratio + j, k] = (
                  w[(i * ratio + j) * num_classes + k] @ codes[b, a, c])
  np.testing.assert_allclose(codes, expected_codes, atol=1e-5)
  np.testing.assert_allclose(scores, expected_scores, atol=1e-4)


def test_void_pixels_contribute_nothing():
  ratio = 4
  labels = np.zeros((1, 8, 8), np.uint8)
  labels[0, :4, 4:] = 1
  labels[0, 4:, :4] = 255                 # one all-void window: not counted
  labels[0, 4, 5] = 255                   # one void pixel in a class-0 window
  moments = reconstruction.accumulate_moments([labels], ratio=ratio, num_classes=3)
  assert moments.num_windows == 3
  np.testing.assert_array_equal(moments.uniform_counts, [1, 1, 0])
  dense = moments.dense()
  void_index = (0 * ratio + 1) * 3 + 0    # pixel (i=0, j=1) of the window at rows 4..7, cols 4..7
  assert dense[void_index, void_index] == 1   # only the uniform class-0 window has class 0 there
  assert moments.trace() == 16 + 16 + 15
  x = dense_windows(list(labels), ratio, 3)
  np.testing.assert_array_equal(dense, x.T @ x)


def test_all_void_labels_cannot_be_fitted():
  with pytest.raises(ValueError, match='non-void'):
    reconstruction.fit_pca([np.full((1, 8, 8), 255, np.uint8)], ratio=4, num_classes=3, num_components=2)


def test_labels_must_be_a_multiple_of_the_ratio():
  with pytest.raises(ValueError, match='multiple of the ratio 4'):
    upper_bound.compress(np.zeros((1, 6, 8), np.uint8), np.zeros((48, 2), np.float32), 4, 3)


def test_save_load_round_trip_and_clear_errors(tmp_path):
  fit = reconstruction.fit_pca([np.array([[[0, 1], [1, 2]]], np.uint8)], ratio=2, num_classes=3,
                               num_components=3)
  path = tmp_path / 'reconstruction.npz'
  reconstruction.save_reconstruction(path, fit)
  loaded = reconstruction.load_reconstruction(path, expect_ratio=2, expect_num_classes=3,
                                              expect_num_components=3)
  np.testing.assert_array_equal(loaded.w, fit.w)
  assert (loaded.ratio, loaded.num_classes, loaded.num_components, loaded.num_windows) == (2, 3, 3, 1)
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    reconstruction.load_reconstruction(tmp_path / 'missing.npz')
  with pytest.raises(ValueError, match=r'reconstruction.npz.*ratio=2 \(expected 16\)'):
    reconstruction.load_reconstruction(path, expect_ratio=16)
  with pytest.raises(ValueError, match=r'num_components=3 \(expected 64\)'):
    reconstruction.load_reconstruction(path, expect_num_classes=3, expect_num_components=64)
  (tmp_path / 'broken.npz').write_bytes(b'not an npz')
  with pytest.raises(ValueError, match='broken.npz'):
    reconstruction.load_reconstruction(tmp_path / 'broken.npz')


@pytest.mark.parametrize('repeats', [1, 3])
def test_sgd_objective_is_the_mean_over_all_windows(real_maps, repeats):
  """A mixed batch holding every mixed window `repeats` times (a possible draw whose value is the
  expectation) gives the exact mean error over all windows, brute-forced on one-hot vectors, for a
  batch of M or of 3M windows (the latter was over-weighted 3x)."""
  maps = [pad(m, 8) for m in real_maps[:2]]
  counts, mixed = upper_bound.collect_windows(([m] for m in maps), ratio=8, num_classes=NUM_CLASSES)
  assert mixed.shape[0] > 10
  rng = np.random.default_rng(0)
  params = {name: jnp.asarray(rng.standard_normal((8 * 8 * NUM_CLASSES, 6)) * 0.1, jnp.float32)
            for name in ('w', 'projection')}
  estimate = upper_bound.sgd_objective(params, np.tile(mixed, (repeats, 1)), counts=counts.astype(np.float32),
                                       num_mixed=mixed.shape[0], num_classes=NUM_CLASSES, ratio=8)
  x = dense_windows(maps, 8, NUM_CLASSES)
  w, projection = np.asarray(params['w'], np.float64), np.asarray(params['projection'], np.float64)
  expected = np.mean(np.sum((x - (x @ projection) @ w.T) ** 2, axis=1))
  np.testing.assert_allclose(float(estimate), expected, rtol=1e-4)


def test_sgd_fit_approaches_pca(real_maps):
  """SGD on ||v - W P v||^2 gets near PCA's error, which no P, W of that size can beat."""
  maps = [pad(m, 8) for m in real_maps]
  x = dense_windows(maps, 8, NUM_CLASSES)
  pca = reconstruction.fit_pca(([m] for m in maps), ratio=8, num_classes=NUM_CLASSES, num_components=16,
                               solver='exact')
  sgd = upper_bound.fit_sgd(([m] for m in maps), ratio=8, num_classes=NUM_CLASSES, num_components=16,
                            steps=500, batch_windows=256, learning_rate=3e-2)

  def error(projection, w):
    return np.mean(np.sum((x - (x @ projection) @ w.T) ** 2, axis=1))

  pca_error, sgd_error = error(pca.w, pca.w), error(sgd.projection, sgd.w)
  assert pca_error <= sgd_error < 3 * pca_error
  assert sgd_error < 0.1 * sgd.losses[0]
