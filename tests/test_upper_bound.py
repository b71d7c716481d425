"""The upper-bound experiment: bilinear baselines against brute force, DUpsample lossless at C' = N."""
import json

import numpy as np
import pytest

from dunet_jax import cli, upper_bound
from dunet_jax.data import label_files


def random_labels(seed: int, shape=(2, 8, 12), num_classes=5) -> np.ndarray:
  labels = np.random.default_rng(seed).integers(0, num_classes, shape).astype(np.uint8)
  labels[0, :4, :4] = 255                                   # one all-void window
  labels[1, 5, 6] = labels[1, 2, 9] = 255
  return labels


def test_area_downsampling_is_the_mean_over_labelled_pixels():
  labels = random_labels(0)
  low = np.asarray(upper_bound.downsample_one_hot(labels, 4, 5, 'area'))
  for b in range(2):
    for a in range(2):
      for c in range(3):
        window = labels[b, 4 * a:4 * a + 4, 4 * c:4 * c + 4].ravel()
        window = window[window != 255]
        expected = np.bincount(window, minlength=5) / max(window.size, 1)
        np.testing.assert_allclose(low[b, a, c], expected, atol=1e-6)


def test_bilinear_downsampling_samples_each_window_centre():
  """antialias=False at ratio 4: the window centre lies between its 2 x 2 central pixels."""
  labels = random_labels(1)
  low = np.asarray(upper_bound.downsample_one_hot(labels, 4, 5, 'bilinear'))
  for b in range(2):
    for a in range(2):
      for c in range(3):
        centre = labels[b, 4 * a + 1:4 * a + 3, 4 * c + 1:4 * c + 3].ravel()
        centre = centre[centre != 255]
        expected = np.bincount(centre, minlength=5) / max(centre.size, 1)
        np.testing.assert_allclose(low[b, a, c], expected, atol=1e-6)


@pytest.mark.parametrize('downsample', ['area', 'bilinear'])
def test_bilinear_baseline_is_exact_on_window_aligned_regions(downsample):
  """Half-pixel centres put the upsampled class boundary exactly on the window boundary."""
  labels = np.zeros((1, 16, 24), np.uint8)
  labels[0, :, 8:] = 1
  labels[0, 12:, :] = 2
  predicted = np.asarray(upper_bound.bilinear_prediction(labels, 4, 3, downsample))
  np.testing.assert_array_equal(predicted, labels)


@pytest.fixture(scope='module')
def tiny_split(voc_labels_dir, tmp_path_factory):
  """2 val real VOC maps (original sizes, not multiples of r, with void bands); train adds one more."""
  folder = tmp_path_factory.mktemp('lists')
  ids = label_files.read_ids(voc_labels_dir / 'lists' / 'voc2012_val_1449.txt')
  (folder / 'train.txt').write_text('\n'.join(ids[2:5]))
  (folder / 'val.txt').write_text('\n'.join(ids[3:5]) + '\n')
  return str(voc_labels_dir / 'SegmentationClass'), folder / 'train.txt', folder / 'val.txt', ids[3:5]


def test_dupsample_with_all_components_is_lossless_and_padding_is_not_scored(tiny_split):
  label_dir, _, _, val_ids = tiny_split
  w = np.linalg.qr(np.random.default_rng(0).standard_normal((4 * 4 * 21, 4 * 4 * 21)))[0].astype(np.float32)
  totals = upper_bound.score_split(label_dir, val_ids, projection=w, w=w, ratio=4, num_classes=21,
                                   components=(336,), downsamples=('area',), batch_size=2)
  labelled = sum(np.sum(label_files.read_label(f'{label_dir}/{i}.png') != 255) for i in val_ids)
  assert totals['dupsample'][0].sum() == labelled == totals['bilinear_area'].sum()
  assert np.trace(totals['dupsample'][0]) == labelled
  assert totals['squared_error'][0] / totals['windows'] < 1e-3


def test_cli_prints_a_table_and_one_json_line(tiny_split, capsys):
  label_dir, train_list, val_list, _ = tiny_split
  cli.run(upper_bound.main, upper_bound.define_flags, argv=[
      'upper_bound', f'--label_dir={label_dir}', f'--train_list={train_list}', f'--val_list={val_list}',
      '--ratio=8', '--num_components=16,64', '--solver=exact'])
  lines = capsys.readouterr().out.strip().splitlines()
  report = json.loads(lines[-1])
  assert 'mIoU' in lines[-6] and 'bilinear_sampling' in lines[-2]
  methods = [(row['method'], row['num_components']) for row in report['rows']]
  assert methods == [('dupsample', 16), ('dupsample', 64), ('bilinear_area', None), ('bilinear_sampling', None)]
  dupsample_16, dupsample_64 = report['rows'][:2]
  assert dupsample_64['pixel_accuracy'] > dupsample_16['pixel_accuracy'] > 0.9
  assert dupsample_64['train_reconstruction_error'] < dupsample_16['train_reconstruction_error']
  assert report['val_maps'] == 2 and report['train_maps'] == 3
