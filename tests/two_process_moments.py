"""One of two localhost processes (2 CPU devices each) that fit window moments on their share of maps.

Run by tests/test_reconstruction.py: `python tests/two_process_moments.py MAPS.npz ADDRESS INDEX OUT.npz`.
Process INDEX reads maps INDEX, INDEX + 2, ...; process 0 writes the summed moments to OUT.npz.
"""
import sys

import jax
import numpy as np

from dunet_jax import reconstruction


def main(maps_file: str, address: str, index: int, out_file: str) -> None:
  jax.config.update('jax_num_cpu_devices', 2)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(address, num_processes=2, process_id=index)
  with np.load(maps_file) as archive:
    maps = [archive[name] for name in sorted(archive.files)][index::2]
  mesh = jax.make_mesh((4, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  moments = reconstruction.accumulate_moments(([m] for m in maps), ratio=8, num_classes=21, mesh=mesh,
                                              chunk_size=64)
  if index == 0:
    np.savez(out_file, dense=moments.dense(), uniform_counts=moments.uniform_counts,
             num_windows=moments.num_windows, num_mixed_windows=moments.num_mixed_windows)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
