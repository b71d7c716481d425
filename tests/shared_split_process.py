"""A second training process on the host of the test process, reading the same shared decoded copy.

Run by tests/test_data_pipeline.py: `python tests/shared_split_process.py MANUAL_DIR TFDS_DIR STEPS OUT.npz`.
Writes the slices of processes 0 and 1 of a two-process job (global batches 0..STEPS-1 of 4, seed
7) to OUT.npz, prints 'ready' and keeps its mappings until its stdin closes, so that the test can
read its /proc/<pid>/smaps.
"""
import sys

import numpy as np

from configs import synthetic as synthetic_config
from dunet_jax.data import datasets, pipeline

GLOBAL_BATCH, SEED = 4, 7


def main(manual_dir: str, tfds_dir: str, steps: int, out_file: str) -> None:
  data = synthetic_config.get_config('test').data
  data.update(manual_dir=manual_dir, tfds_data_dir=tfds_dir, synthetic_num_train=12,
              synthetic_num_val=5, pad_pixel=(124, 116, 104))
  builder = datasets.prepare(data)
  slices = {}
  for index in range(2):
    batches = pipeline.train_batches(builder, data, split='train', global_batch_size=GLOBAL_BATCH,
                                     seed=SEED, process_index=index, process_count=2)
    taken = [next(batches) for _ in range(steps)]
    slices.update({f'{key}_{index}': np.stack([batch[key] for batch in taken])
                   for key in ('image', 'label')})
  np.savez(out_file, **slices)
  print('ready', flush=True)
  sys.stdin.read()


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
