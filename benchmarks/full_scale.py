"""Full scale on real VOC geometry: builder, training pipeline, memory and full evaluation; one JSON line.

  python benchmarks/full_scale.py               # all 12,031 real label maps
  python benchmarks/full_scale.py --maps=120    # the same, end to end on ~120 maps (a few minutes)

Paints the VOC-shaped dataset on the real label maps of ../shared/data/voc2012_labels
(dunet_jax/data/voc_geometry.py, train_aug 10,582 and val 1,449 at full scale) into --workdir
(emptied first), then measures, each phase in a fresh process so that its peak RSS is its own:
  generate_s      painting the two archives (all cores)
  build_s         the voc_segmentation builder (TFDS) on them
  start_*         pipeline.train_batches to its first batch: `cold` builds the host's shared
                  decoded copy of train_aug, `warm` maps the existing one
  train_*         steady training images/s at crop 512 with full augmentation (scale 0.5-2, flip,
                  photometric) on one tf.data thread (= per core) and on all cores
  memory_*        1 process, then 4 processes of one job (each its slice of global batch 16) running
                  together for one epoch of global batches: the sum over processes of RSS and PSS
                  (proportional set size: a page shared by n processes counts 1/n in each), sampled
                  every 0.2 s, maxima; each process's peak RSS. `memory_gib_*` = PSS sum + the JPEG
                  files (read through the page cache, once for all processes) is what the host holds;
                  the target is memory_gib_4_processes < 1.5 x memory_gib_1_process.
  eval_*          every val image at its original size (padded to 512) through pipeline.eval_batches
                  and a small DUNet (configs/voc_geometry.py:test's net, random weights: time and
                  memory only) on the CPU, single scale and scales 0.5..1.75 + flip: seconds per image
                  and peak RSS
"""
import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GIB = 2**30
GLOBAL_BATCH = 16
CROP = 512
EVAL_BATCH = 4
EVAL_PAD = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  from configs import voc_geometry as voc_geometry_config
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--labels_dir', default=str(voc_geometry_config.LABELS_DIR),
                      help='the real label maps (SegmentationClass/, lists/)')
  parser.add_argument('--maps', type=int, default=0, help='about this many maps (0: all 12,031)')
  parser.add_argument('--workdir', default='/tmp/dunet_jax_full_scale',
                      help='archives, built dataset and decoded copy go here (emptied first)')
  parser.add_argument('--seconds', type=float, default=30.0, help='time per throughput measurement')
  parser.add_argument('--processes', type=int, default=4, help='processes of the memory comparison')
  parser.add_argument('--eval_split', default='val',
                      help="split evaluated (e.g. 'val[:200]' for a shorter multi-scale run)")
  parser.add_argument('--keep', action='store_true', help='keep --workdir afterwards')
  parser.add_argument('--phase', default='', help=argparse.SUPPRESS)  # internal: one phase's process
  parser.add_argument('--index', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--count', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--steps', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--multiscale', action='store_true', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def data_config(args: argparse.Namespace):
  from configs import voc_geometry as voc_geometry_config
  config = voc_geometry_config.get_config('test')
  config.data.update(geometry_labels_dir=args.labels_dir, geometry_maps=args.maps,
                     manual_dir=f'{args.workdir}/manual', tfds_data_dir=f'{args.workdir}/tfds',
                     crop_size=CROP, min_scale=0.5, max_scale=2.0, flip=True, photometric=True,
                     eval_pad_size=EVAL_PAD)
  return config


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# ---- phases, each run in its own process; each returns a dict printed as the last line ----------

def phase_prepare(args) -> dict:
  from dunet_jax.data import datasets, voc_geometry
  config = data_config(args)
  started = time.perf_counter()
  voc_geometry.generate(args.labels_dir, config.data.manual_dir, maps=args.maps,
                        workers=len(os.sched_getaffinity(0)))
  generated = time.perf_counter()
  builder = datasets.prepare(config.data)  # the archives are in place: this only builds
  built = time.perf_counter()
  return {'generate_s': generated - started, 'build_s': built - generated,
          'splits': {name: info.num_examples for name, info in builder.info.splits.items()},
          'archives_gib': sum((pathlib.Path(config.data.manual_dir) / name).stat().st_size
                              for name in ('VOCtrainval_11-May-2012.tar', 'benchmark.tgz')) / GIB}


def _builder(args):
  from dunet_jax.data import datasets
  return datasets.prepare(data_config(args).data)


def _train_batches(args, builder, num_threads: int | None, index: int = 0, count: int = 1):
  from dunet_jax.data import pipeline
  return pipeline.train_batches(builder, data_config(args).data, split='train_aug',
                                global_batch_size=GLOBAL_BATCH, seed=0, process_index=index,
                                process_count=count, num_threads=num_threads)


def phase_start(args) -> dict:
  builder = _builder(args)
  started = time.perf_counter()
  next(_train_batches(args, builder, None))
  return {'start_s': time.perf_counter() - started, 'peak_rss_gib': peak_rss_gib()}


def phase_train(args) -> dict:
  sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
  from input_pipeline import measure  # noqa: PLC0415
  builder = _builder(args)
  rates = {}
  for name, threads in (('one_thread', 1), ('all_cores', None)):
    rates[name] = measure(_train_batches(args, builder, threads), GLOBAL_BATCH, args.seconds)
  return {'rates': rates, 'peak_rss_gib': peak_rss_gib()}


def phase_worker(args) -> dict:
  """One of `count` processes of a job: its slice of `steps` global batches."""
  threads = max(1, len(os.sched_getaffinity(0)) // args.count)
  batches = _train_batches(args, _builder(args), threads, args.index, args.count)
  started = time.perf_counter()
  for _ in range(args.steps):
    next(batches)
  return {'seconds': time.perf_counter() - started, 'peak_rss_gib': peak_rss_gib()}


def phase_eval(args) -> dict:
  import jax
  from flax import nnx

  from dunet_jax import evaluate, inference, sharding
  from dunet_jax.models import dunet
  config = data_config(args)
  config.eval.batch_size = EVAL_BATCH
  builder = _builder(args)
  mesh = sharding.data_parallel_mesh()
  model = dunet.DUNet(config.model, config.data.num_classes, reconstruction=None, rngs=nnx.Rngs(0))
  scales = inference.MULTISCALE_SCALES if args.multiscale else (1.0,)
  # Compile on one batch first, so the time is the evaluation's, not XLA's.
  evaluate.evaluate_model(model, config, mesh, builder, split='val[:1]', scales=scales,
                          flip=args.multiscale)
  started = time.perf_counter()
  result = evaluate.evaluate_model(model, config, mesh, builder, split=args.eval_split,
                                   scales=scales, flip=args.multiscale)
  seconds = time.perf_counter() - started
  return {'images': result['num_images'], 'seconds': seconds,
          's_per_image': seconds / result['num_images'], 'peak_rss_gib': peak_rss_gib(),
          'devices': jax.device_count()}


PHASES = {'prepare': phase_prepare, 'start': phase_start, 'train': phase_train,
          'worker': phase_worker, 'eval': phase_eval}


# ---- the orchestrating process (imports no TensorFlow) -------------------------------------------

def phase_command(args, phase: str, **extra) -> list[str]:
  command = [sys.executable, __file__, f'--phase={phase}', f'--labels_dir={args.labels_dir}',
             f'--maps={args.maps}', f'--workdir={args.workdir}', f'--seconds={args.seconds}',
             f'--eval_split={args.eval_split}']
  return command + [f'--{key}={value}' if value is not True else f'--{key}'
                    for key, value in extra.items()]


def run_phase(args, phase: str, **extra) -> dict:
  process = subprocess.run(phase_command(args, phase, **extra), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  if process.returncode:
    raise RuntimeError(f'phase {phase} failed:\n{process.stderr[-4000:]}')
  result = json.loads(process.stdout.strip().splitlines()[-1])
  print(json.dumps({'phase': phase, **extra, **result}), file=sys.stderr, flush=True)  # a long run's progress
  return result


def _memory_of(pid: int) -> tuple[int, int]:
  """(RSS, PSS) of a live process in bytes, from /proc/<pid>/smaps_rollup."""
  values = {}
  for line in pathlib.Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines():
    fields = line.split()
    if fields[0] in ('Rss:', 'Pss:'):
      values[fields[0]] = int(fields[1]) * 1024
  return values['Rss:'], values['Pss:']


def run_job(args, count: int, steps: int) -> dict:
  """`count` worker processes at once; the maxima of their summed RSS and PSS while they run."""
  processes = [subprocess.Popen(phase_command(args, 'worker', index=index, count=count, steps=steps),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(count)]
  peak_rss = peak_pss = 0
  while any(process.poll() is None for process in processes):
    try:
      sizes = [_memory_of(process.pid) for process in processes]
    except (FileNotFoundError, ProcessLookupError, KeyError):  # one just ended
      sizes = []
    if len(sizes) == count:
      peak_rss = max(peak_rss, sum(rss for rss, _ in sizes))
      peak_pss = max(peak_pss, sum(pss for _, pss in sizes))
    time.sleep(0.2)
  reports = []
  for process in processes:
    stdout, stderr = process.communicate()
    if process.returncode:
      raise RuntimeError(f'a worker failed:\n{stderr[-4000:]}')
    reports.append(json.loads(stdout.strip().splitlines()[-1]))
  return {'rss_sum_gib': peak_rss / GIB, 'pss_sum_gib': peak_pss / GIB,
          'peak_rss_per_process_gib': max(report['peak_rss_gib'] for report in reports),
          'seconds': max(report['seconds'] for report in reports)}


def decoded_copy(args) -> pathlib.Path:
  found = sorted(pathlib.Path(args.workdir, 'tfds').glob('voc_segmentation/voc2012/*/decoded/train_aug-*'))
  found = [path for path in found if path.is_dir()]
  if len(found) != 1:
    raise RuntimeError(f'expected one decoded copy of train_aug under {args.workdir}, found {found}')
  return found[0]


def folder_bytes(path: pathlib.Path) -> int:
  return sum(entry.stat().st_size for entry in path.rglob('*') if entry.is_file())


def orchestrate(args) -> dict:
  shutil.rmtree(args.workdir, ignore_errors=True)
  cores = len(os.sched_getaffinity(0))
  result = {'maps': args.maps or 'all', 'cores': cores, 'crop_size': CROP,
            'global_batch_size': GLOBAL_BATCH}
  prepared = run_phase(args, 'prepare')
  result.update(generate_s=round(prepared['generate_s'], 1), build_s=round(prepared['build_s'], 1),
                splits=prepared['splits'], archives_gib=round(prepared['archives_gib'], 3))
  cold = run_phase(args, 'start')
  warm = run_phase(args, 'start')
  copy = decoded_copy(args)
  labels_bytes = (copy / 'labels.u8').stat().st_size
  images_bytes = folder_bytes(copy / 'images')
  result.update(start_s_cold=round(cold['start_s'], 2), start_s_warm=round(warm['start_s'], 2),
                start_peak_rss_gib_cold=round(cold['peak_rss_gib'], 3),
                label_pixels=labels_bytes, label_pixels_over_2_31=round(labels_bytes / 2**31, 3),
                decoded_labels_gib=round(labels_bytes / GIB, 3),
                jpeg_bytes_gib=round(images_bytes / GIB, 3))
  train = run_phase(args, 'train')
  rates = train['rates']
  result.update(
      train_images_per_s_one_thread=round(rates['one_thread']['per_s'], 1),
      train_images_per_cpu_s_one_thread=round(rates['one_thread']['per_cpu_s'], 1),
      train_images_per_s_all_cores=round(rates['all_cores']['per_s'], 1),
      train_images_per_s_per_core_all_cores=round(rates['all_cores']['per_s'] / cores, 1),
      train_peak_rss_gib=round(train['peak_rss_gib'], 3))
  steps = -(-prepared['splits']['train_aug'] // GLOBAL_BATCH)  # one epoch of global batches
  for count in (1, args.processes):
    job = run_job(args, count, steps)
    suffix = '1_process' if count == 1 else f'{count}_processes'
    result.update({f'memory_rss_sum_gib_{suffix}': round(job['rss_sum_gib'], 3),
                   f'memory_pss_sum_gib_{suffix}': round(job['pss_sum_gib'], 3),
                   f'memory_gib_{suffix}': round(job['pss_sum_gib'] + images_bytes / GIB, 3),
                   f'peak_rss_per_process_gib_{suffix}': round(job['peak_rss_per_process_gib'], 3),
                   f'epoch_s_{suffix}': round(job['seconds'], 1)})
  result['memory_ratio'] = round(result[f'memory_gib_{args.processes}_processes']
                                 / result['memory_gib_1_process'], 3)
  for name, multiscale in (('single_scale', False), ('multiscale_flip', True)):
    evaluation = run_phase(args, 'eval', **({'multiscale': True} if multiscale else {}))
    result.update({f'eval_{name}_images': evaluation['images'],
                   f'eval_{name}_s_per_image': round(evaluation['s_per_image'], 4),
                   f'eval_{name}_peak_rss_gib': round(evaluation['peak_rss_gib'], 3)})
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)
  return result


def main() -> None:
  args = parse_args()
  if args.phase:
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout gets one JSON line
      report = PHASES[args.phase](args)
    print(json.dumps(report))
    return
  started = time.perf_counter()
  result = orchestrate(args)
  result['total_s'] = round(time.perf_counter() - started, 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
