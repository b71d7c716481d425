"""Wall time and label maps/s of fitting W on real labels, beside a plain numpy reference.

  python benchmarks/fit_w.py [--label_dir=...] [--list=...] [--ratios=16,32] [--num_components=64]
      [--reference_maps=50,10] [--max_maps=0]

Ours: the whole split through dunet_jax.data.label_files (PNG reading included) and
reconstruction.fit_pca (solver='randomized'). Reference, on the first `reference_maps` maps of
the same list (one count per ratio): PIL reading, dense one-hot windows, X.T @ X, numpy.linalg.eigh. The reference's
eigh at r = 32 (N = 21,504) would take hours here, so above N = 8192 it only accumulates X.T @ X
and that is said in the output. CPU seconds are given beside wall seconds because this machine is
shared. Prints one JSON line.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dunet_jax import reconstruction  # noqa: E402
from dunet_jax.data import label_files  # noqa: E402

LABELS = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'voc2012_labels'
REFERENCE_EIGH_MAX = 8192


def reference_fit(label_dir: pathlib.Path, ids: list[str], ratio: int, num_classes: int,
                  num_components: int) -> dict:
  """Dense one-hot windows, X.T @ X, numpy.linalg.eigh: the straightforward way."""
  size = ratio * ratio * num_classes
  started, cpu = time.time(), time.process_time()
  moment = np.zeros((size, size), np.float64)
  for start in range(0, len(ids), 10):
    rows = []
    for label_id in ids[start:start + 10]:
      label = label_files.read_label(label_dir / f'{label_id}.png')
      height, width = -(-label.shape[0] // ratio) * ratio, -(-label.shape[1] // ratio) * ratio
      padded = np.full((height, width), 255, np.uint8)
      padded[:label.shape[0], :label.shape[1]] = label
      one_hot = (padded[..., None] == np.arange(num_classes)).astype(np.float32)
      windows = one_hot.reshape(height // ratio, ratio, width // ratio, ratio, num_classes)
      rows.append(windows.transpose(0, 2, 1, 3, 4).reshape(-1, size))
    x = np.concatenate(rows)
    moment += x.T @ x
  accumulate_seconds = time.time() - started
  result = {'maps': len(ids), 'accumulate_seconds': round(accumulate_seconds, 2)}
  if size <= REFERENCE_EIGH_MAX:
    _, vectors = np.linalg.eigh(moment)
    result['w'] = vectors[:, ::-1][:, :num_components]
    result['seconds'] = round(time.time() - started, 2)
  else:
    result['eigh'] = f'skipped: numpy.linalg.eigh of {size}x{size} takes hours on this machine'
  result['cpu_seconds'] = round(time.process_time() - cpu, 2)
  return result


def our_fit(label_dir: pathlib.Path, ids: list[str], ratio: int, num_classes: int,
            num_components: int) -> tuple[dict, reconstruction.ReconstructionFit]:
  started, cpu = time.time(), time.process_time()
  batches = label_files.label_batches(label_dir, ids, ratio=ratio, batch_size=16)
  moments = reconstruction.accumulate_moments((batch['label'] for batch in batches), ratio=ratio,
                                              num_classes=num_classes)
  accumulate_seconds = time.time() - started
  fit = reconstruction.solve_moments(moments, num_components, solver='randomized')
  seconds = time.time() - started
  return {'maps': len(ids), 'seconds': round(seconds, 2), 'accumulate_seconds': round(accumulate_seconds, 2),
          'cpu_seconds': round(time.process_time() - cpu, 2), 'maps_per_second': round(len(ids) / seconds, 1),
          'windows': moments.num_windows, 'mixed_windows': moments.num_mixed_windows,
          'class_pair_blocks': len(moments.blocks)}, fit


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--label_dir', default=str(LABELS / 'SegmentationClass'))
  parser.add_argument('--list', default=str(LABELS / 'lists' / 'train_aug_10582.txt'))
  parser.add_argument('--ratios', default='16,32')
  parser.add_argument('--num_classes', type=int, default=21)
  parser.add_argument('--num_components', type=int, default=64)
  parser.add_argument('--reference_maps', default='50,10', help='per ratio')
  parser.add_argument('--max_maps', type=int, default=0, help='0: the whole list')
  args = parser.parse_args()
  label_dir = pathlib.Path(args.label_dir)
  ids = label_files.read_ids(args.list)
  ids = ids[:args.max_maps] if args.max_maps else ids
  results = {'list': pathlib.Path(args.list).name, 'num_components': args.num_components}
  ratios = [int(r) for r in args.ratios.split(',')]
  reference_maps = [int(n) for n in args.reference_maps.split(',')]
  if len(reference_maps) != len(ratios):
    parser.error(f'--reference_maps needs one count per ratio in --ratios={args.ratios}.')
  for ratio, num_reference in zip(ratios, reference_maps):
    ours, fit = our_fit(label_dir, ids, ratio, args.num_classes, args.num_components)
    reference_ids = ids[:num_reference]
    reference = reference_fit(label_dir, reference_ids, ratio, args.num_classes, args.num_components)
    small, small_fit = our_fit(label_dir, reference_ids, ratio, args.num_classes, args.num_components)
    entry = {'ours_all': ours, 'ours_on_reference_subset': small,
             'reference': {key: value for key, value in reference.items() if key != 'w'}}
    if 'w' in reference:
      overlap = np.linalg.svd(small_fit.w.astype(np.float64).T @ reference['w'], compute_uv=False)
      entry['subset_w_min_cosine_vs_reference'] = round(float(overlap.min()), 6)
      entry['speedup_per_map'] = round((reference['seconds'] / len(reference_ids)) / (ours['seconds'] / len(ids)), 1)
    entry['accumulate_speedup_per_map'] = round(
        (reference['accumulate_seconds'] / len(reference_ids)) / (ours['accumulate_seconds'] / len(ids)), 1)
    results[f'r{ratio}'] = entry
  print(json.dumps(results))


if __name__ == '__main__':
  main()
