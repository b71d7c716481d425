"""Decode COCO-style run-length encoded masks (the Detail API's trainval_merged.json uses them).

Written here so that reading PASCAL Context needs neither pycocotools nor the Detail package.
Format: runs alternate 0s and 1s (starting with 0s) over the mask in column-major order; the
compressed string form packs each run in 5-bit groups (char = group + 48, 0x20 = more groups
follow, 0x10 in the last group = negative), and runs after the second are stored as differences
from the run two places before.
"""
import numpy as np


def decode_counts(counts: str) -> list[int]:
  """Run lengths of a compressed RLE string."""
  runs: list[int] = []
  position = 0
  while position < len(counts):
    value, shift, more = 0, 0, True
    while more:
      group = ord(counts[position]) - 48
      value |= (group & 0x1F) << shift
      more = bool(group & 0x20)
      position += 1
      shift += 5
      if not more and group & 0x10:
        value |= -1 << shift
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def decode(rle: dict) -> np.ndarray:
  """{'size': [height, width], 'counts': str or list of ints} -> bool mask (height, width)."""
  height, width = (int(s) for s in rle['size'])
  counts = rle['counts']
  if isinstance(counts, bytes):
    counts = counts.decode('ascii')
  runs = decode_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
  if sum(runs) != height * width or min(runs, default=0) < 0:
    raise ValueError(f'run lengths sum to {sum(runs)}, not height*width={height * width}')
  values = np.arange(len(runs)) % 2 == 1
  flat = np.repeat(values, runs)
  return flat.reshape((width, height)).T
