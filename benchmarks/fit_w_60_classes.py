"""W at PASCAL Context's scale: 60 classes at r = 32 (N = 61,440) on Context-like labels; one JSON line.

  python benchmarks/fit_w_60_classes.py [--maps=4998] [--ratio=32] [--num_components=64]

Real PASCAL Context labels are not available here, so this builds a stand-in with Context's
structure from the real VOC train_aug maps in ../shared/data/voc2012_labels: the 20 object classes
and the void band stay as they are, and each map's background becomes three "stuff" classes
(21..59, drawn with Zipf-like frequencies, as Context's stuff is dominated by a few classes) laid
out as wavy horizontal bands (sky / wall / floor). Every pixel but the void band is then labelled,
as in Context, and windows that straddle stuff boundaries make many more mixed windows and class
pairs than VOC has. The first --maps maps are used (Context train has 4,998).

Reports the accumulation and solver times (wall and CPU), how many class-pair blocks of r*r x r*r
the moments hold and in which integer types (their memory is what limits N), peak resident memory,
and the reconstruction error (mean squared distance of a window's one-hot vector to its projection).
"""
import argparse
import collections
import json
import pathlib
import resource
import sys
import time
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dunet_jax import reconstruction  # noqa: E402
from dunet_jax.data import label_files  # noqa: E402

LABELS = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'voc2012_labels'
NUM_CLASSES = 60
FIRST_STUFF_CLASS = 21
STUFF_PER_MAP = 3


def context_like(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """(B, H, W) VOC labels -> the same objects on three wavy bands of stuff classes."""
  stuff = np.arange(FIRST_STUFF_CLASS, NUM_CLASSES)
  frequency = 1.0 / np.arange(1, stuff.size + 1)
  out = labels.copy()
  rows, cols = np.mgrid[:labels.shape[1], :labels.shape[2]]
  for index, label in enumerate(labels):
    classes = rng.choice(stuff, STUFF_PER_MAP, replace=False, p=frequency / frequency.sum())
    labelled_rows = np.flatnonzero((label != 255).any(1))
    height = labelled_rows[-1] + 1 if labelled_rows.size else label.shape[0]
    cuts = np.sort(rng.uniform(0.2, 0.8, STUFF_PER_MAP - 1)) * height
    wobble = rng.uniform(5, 20) * np.sin(2 * np.pi * cols / rng.uniform(60, 240) + rng.uniform(0, 2 * np.pi))
    band = np.searchsorted(cuts, rows + wobble)
    out[index] = np.where(label == 0, classes[band], label)
  return out


def batches(ids: list[str], ratio: int, seed: int) -> Iterator[np.ndarray]:
  rng = np.random.default_rng(seed)
  for batch in label_files.label_batches(LABELS / 'SegmentationClass', ids, ratio=ratio, batch_size=16):
    yield context_like(batch['label'], rng)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--maps', type=int, default=4998)
  parser.add_argument('--ratio', type=int, default=32)
  parser.add_argument('--num_components', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  ids = label_files.read_ids(LABELS / 'lists' / 'train_aug_10582.txt')[:args.maps]
  started, cpu = time.time(), time.process_time()
  moments = reconstruction.accumulate_moments(batches(ids, args.ratio, args.seed), ratio=args.ratio,
                                              num_classes=NUM_CLASSES)
  accumulated, accumulated_cpu = time.time(), time.process_time()
  fit = reconstruction.solve_moments(moments, args.num_components, solver='randomized')
  solved, solved_cpu = time.time(), time.process_time()
  block_bytes = sum(block.nbytes for block in moments.blocks.values())
  block_types = collections.Counter(str(block.dtype) for block in moments.blocks.values())
  print(json.dumps({
      'maps': len(ids), 'ratio': args.ratio, 'num_classes': NUM_CLASSES, 'N': moments.size,
      'num_components': args.num_components, 'windows': moments.num_windows,
      'mixed_windows': moments.num_mixed_windows, 'class_pair_blocks': len(moments.blocks),
      'block_gib': round(block_bytes / 2 ** 30, 2), 'block_types': dict(sorted(block_types.items())),
      'accumulate_seconds': round(accumulated - started, 1),
      'accumulate_cpu_seconds': round(accumulated_cpu - cpu, 1),
      'solve_seconds': round(solved - accumulated, 1), 'solve_cpu_seconds': round(solved_cpu - accumulated_cpu, 1),
      'total_seconds': round(solved - started, 1),
      'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
      'reconstruction_error': round(reconstruction.reconstruction_error(moments, fit.w), 4),
      'top_eigenvalue_share': round(float(fit.eigenvalues[0] * moments.num_windows / moments.trace()), 4)}))


if __name__ == '__main__':
  main()
