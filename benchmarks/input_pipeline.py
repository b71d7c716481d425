"""Training input pipeline speed per CPU core, and host cores needed per accelerator; one JSON line.

  python benchmarks/input_pipeline.py                          # crop 512, step time estimated
  python benchmarks/input_pipeline.py --step_time=0.25 --batch_size=16 --photometric

Builds a VOC-layout dataset from the six real VOC JPEGs (about 500x375) and their real labels in
../shared/data/voc2012_labels, replicated, with the project's voc_segmentation builder, then times
in the same run: plain JPEG decoding of those files (tf.data, one thread), and the full training
pipeline (decode image, random scale, pad, crop, flip; labels are decoded once, into the split's
shared decoded copy)
with tf.data limited to one thread and with all cores. Rates are given per second of wall time
and per second of process CPU time; the second is much less disturbed by other processes on a
shared machine. `train_start_s_*` is the time from calling pipeline.train_batches to its first
batch: the one-thread run starts first and builds the shared copy (it grows with the split: every
label is decoded then), the all-cores run maps it.

Host cores needed = batch_size / step_time / (training images per second on one core). Without
--step_time the step time is estimated as 3 x forward FLOPs (XLA cost analysis of DUNet with
configs/default.py's model at the crop size) x batch_size / (peak_flops x mfu).
"""
import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from configs import default  # noqa: E402
from dunet_jax.data import datasets, pipeline  # noqa: E402

VOC_LABELS_DIR = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'voc2012_labels'
H100_BF16_PEAK = 989e12  # dunet_jax/throughput.py's table: H100 / H200 SXM dense bf16


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--labels_dir', default=str(VOC_LABELS_DIR),
                      help='folder with JPEGImages/, SegmentationClass/ and lists/with_jpeg.txt')
  parser.add_argument('--stand_in', action='store_true',
                      help='no VOC samples on this host: use 6 generated 500x375 scenes instead')
  parser.add_argument('--copies', type=int, default=50, help='replicas of each real image')
  parser.add_argument('--crop_size', type=int, default=512)
  parser.add_argument('--photometric', action='store_true', help='add photometric distortion')
  parser.add_argument('--batch_size', type=int, default=16, help='images per accelerator step')
  parser.add_argument('--step_time', type=float, default=0.0,
                      help='seconds per accelerator step (0: estimate from FLOPs)')
  parser.add_argument('--peak_flops', type=float, default=H100_BF16_PEAK,
                      help='accelerator peak FLOP/s for the step time estimate')
  parser.add_argument('--mfu', type=float, default=0.4, help='assumed MFU for the estimate')
  parser.add_argument('--seconds', type=float, default=15.0, help='time per measurement')
  return parser.parse_args()


def write_stand_in(root: pathlib.Path, count: int = 6) -> pathlib.Path:
  """A --labels_dir of generated scenes (dunet_jax.data.synthetic) at VOC's 500x375, with sensor-like
  noise so that the JPEGs (about 80 KB at quality 90) cost about what VOC's (40-150 KB) cost to decode."""
  from PIL import Image  # noqa: PLC0415
  from dunet_jax.data import palette, synthetic  # noqa: PLC0415

  for folder in ('JPEGImages', 'SegmentationClass', 'lists'):
    (root / folder).mkdir(parents=True, exist_ok=True)
  ids = [f'stand_in_{index}' for index in range(count)]
  for index, image_id in enumerate(ids):
    rng = np.random.default_rng([0, index])
    image, label = synthetic.render_scene(rng)
    image = np.asarray(Image.fromarray(image).resize((500, 375), Image.BILINEAR), np.float32)
    image = (image + rng.normal(0, 12, image.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / 'JPEGImages' / f'{image_id}.jpg', quality=90)
    label = Image.fromarray(label, mode='P').resize((500, 375), Image.NEAREST)
    label.putpalette(palette.VOC_COLORMAP.tobytes())  # VOC's palette PNGs
    label.save(root / 'SegmentationClass' / f'{image_id}.png')
  (root / 'lists' / 'with_jpeg.txt').write_text('\n'.join(ids) + '\n')
  return root


def write_voc_tree(labels_dir: pathlib.Path, root: pathlib.Path, copies: int) -> int:
  """VOCdevkit/VOC2012 with every real JPEG and its palette label copied `copies` times."""
  ids = (labels_dir / 'lists' / 'with_jpeg.txt').read_text().split()
  if not ids:
    raise FileNotFoundError(f'{labels_dir}/lists/with_jpeg.txt lists no images: check --labels_dir')
  voc = root / 'VOCdevkit' / 'VOC2012'
  for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    (voc / folder).mkdir(parents=True, exist_ok=True)
  names = []
  for image_id in ids:
    for copy in range(copies):
      name = f'{image_id}_{copy:04d}'
      shutil.copyfile(labels_dir / 'JPEGImages' / f'{image_id}.jpg',
                      voc / 'JPEGImages' / f'{name}.jpg')
      shutil.copyfile(labels_dir / 'SegmentationClass' / f'{image_id}.png',
                      voc / 'SegmentationClass' / f'{name}.png')
      names.append(name)
  lists = {'train': names, 'val': names[:1], 'trainval': names}
  for split, split_ids in lists.items():
    (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(split_ids) + '\n')
  return len(names)


def measure(batches: Iterator, images_per_batch: int, seconds: float) -> dict[str, float]:
  """Images per wall second and per process-CPU second, after two warm-up batches."""
  for _ in range(2):
    next(batches)
  wall, cpu, count = time.perf_counter(), time.process_time(), 0
  while time.perf_counter() - wall < seconds:
    next(batches)
    count += images_per_batch
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {'per_s': count / wall, 'per_cpu_s': count / cpu}


def jpeg_decode_batches(builder: tfds.core.DatasetBuilder, batch_size: int) -> Iterator:
  """Plain decode_jpeg of the split's files, read from memory, on one tf.data thread."""
  images = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  images = images.map(lambda features: features['image']).cache()
  for _ in images:
    pass
  # The decoded size is only known after decoding, so returning it keeps the decode.
  heights = images.repeat().map(lambda jpeg: tf.shape(tf.io.decode_jpeg(jpeg))[0],
                                num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  return iter(heights.batch(batch_size).with_options(options))


def estimated_step_time(crop_size: int, batch_size: int, peak_flops: float, mfu: float) -> float:
  """3 x forward FLOPs per image (XLA cost analysis, no weights made) x batch / (peak x mfu)."""
  import jax  # noqa: PLC0415 (only needed for the estimate)
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from dunet_jax.models import dunet  # noqa: PLC0415

  model_config = default.get_config().model
  model = nnx.eval_shape(lambda: dunet.DUNet(model_config, 21, reconstruction=None,
                                             rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  image = jax.ShapeDtypeStruct((1, crop_size, crop_size, 3), jnp.float32)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  flops = forward.lower(state, image).cost_analysis()['flops']
  return 3 * flops * batch_size / (peak_flops * mfu)


def main() -> None:
  args = parse_args()
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout gets one JSON line
    result = run(args)
  print(json.dumps(result))


def run(args: argparse.Namespace) -> dict:
  tf.config.set_visible_devices([], 'GPU')
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    labels_dir = write_stand_in(root / 'stand_in') if args.stand_in else pathlib.Path(args.labels_dir)
    num_images = write_voc_tree(labels_dir, root / 'manual', args.copies)
    data = default.get_config().data
    data.update(builder_config='voc2012', manual_dir=str(root / 'manual'),
                tfds_data_dir=str(root / 'tfds'), train_split='train', eval_split='val',
                crop_size=args.crop_size, photometric=args.photometric)
    builder = datasets.prepare(data)

    batch = 16
    decode = measure(jpeg_decode_batches(builder, batch), batch, args.seconds)
    train, start = {}, {}
    for name, threads in (('one_thread', 1), ('all_cores', None)):
      started = time.perf_counter()
      batches = pipeline.train_batches(builder, data, split='train', global_batch_size=batch,
                                       seed=0, num_threads=threads)
      next(batches)
      start[name] = time.perf_counter() - started
      train[name] = measure(batches, batch, args.seconds)

  step_time = args.step_time or estimated_step_time(args.crop_size, args.batch_size,
                                                    args.peak_flops, args.mfu)
  per_core = train['one_thread']['per_s']
  needed = args.batch_size / step_time
  return {
      'crop_size': args.crop_size,
      'photometric': args.photometric,
      'dataset': (f'{num_images} generated 500x375 JPEGs (6 stand-in scenes, replicated)' if args.stand_in else
                  f'{num_images} VOC JPEGs (~500x375, 6 real images with real labels, replicated)'),
      'cores': cores,
      'train_images_per_s_one_thread': round(per_core, 1),
      'train_images_per_cpu_s_one_thread': round(train['one_thread']['per_cpu_s'], 1),
      'train_images_per_s_all_cores': round(train['all_cores']['per_s'], 1),
      'train_images_per_s_per_core_all_cores': round(train['all_cores']['per_s'] / cores, 1),
      'jpeg_decode_images_per_s_one_thread': round(decode['per_s'], 1),
      'jpeg_decode_images_per_cpu_s_one_thread': round(decode['per_cpu_s'], 1),
      'train_over_decode': round(per_core / decode['per_s'], 3),
      'train_over_decode_cpu': round(train['one_thread']['per_cpu_s'] / decode['per_cpu_s'], 3),
      'train_start_s_one_thread': round(start['one_thread'], 2),
      'train_start_s_all_cores': round(start['all_cores'], 2),
      'batch_size': args.batch_size,
      'step_time_s': round(step_time, 4),
      'step_time_source': ('given' if args.step_time else
                           f'estimate: 3 x XLA forward FLOPs of configs/default.py model x batch / '
                           f'({args.peak_flops:.3g} FLOP/s x MFU {args.mfu})'),
      'images_per_s_needed': round(needed, 1),
      'host_cores_needed': round(needed / per_core, 2),
      'host_cores_needed_cpu_time': round(needed / train['one_thread']['per_cpu_s'], 2),
  }


if __name__ == '__main__':
  main()
