"""Training: W from the labels, jitted train and eval steps over a Mesh, checkpoints, resume.

`train_and_evaluate(config, workdir)` is the whole job. It is safe to rerun: it resumes from
the newest readable checkpoint (parameters, optimizer state and step; the data pipeline and
augmentation are pure functions of the seed and the step, so a resumed run sees the batches an
uninterrupted one would), saves a checkpoint and exits on a preemption notice (see
`dunet_jax.preemption`), and stops on a NaN or Inf loss without overwriting the last good checkpoint.
"""
import itertools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from dunet_jax import (checkpoint, evaluate, event_writer, fine_tune, metrics, multihost, preemption, profiling,
                       progress, reconstruction, sharding, storage, throughput, train_state, xla_options)
from dunet_jax.data import IGNORE_LABEL, datasets, pipeline
from dunet_jax.models import config_checks


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the non-void pixels of the whole (global) batch, in float32."""
  logits = logits.astype(jnp.float32)
  valid = labels != IGNORE_LABEL
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def make_train_step(mesh: Mesh, shardings: train_state.TrainState) -> Callable[..., Any]:
  """The jitted step (state, batch) -> (state, metrics): loss, grads, optimizer update and new
  BatchNorm statistics, with the state laid out by `shardings` and donated."""

  def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
    def loss_fn(params, model_state):
      net = nnx.merge(state.graphdef, params, model_state, copy=True)
      loss = cross_entropy(net(batch['image']), batch['label'])
      return loss, nnx.state(net, nnx.Not(nnx.Param))

    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.model_state)
    state = state.apply_gradients(grads, model_state)
    finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.isfinite(leaf).all()
                                                     for leaf in jax.tree.leaves(state.params)]))
    return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'finite': finite}

  return jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def fit_or_load_w(config: ml_collections.ConfigDict, workdir: epath.Path, builder: Any,
                  mesh: Mesh) -> np.ndarray | None:
  """W from the workdir if the run already fitted it, else one streaming PCA pass over the labels."""
  if config.model.decoder != 'dupsample':
    return None
  path = workdir / checkpoint.RECONSTRUCTION_FILE
  expected = dict(expect_ratio=config.model.output_stride, expect_num_classes=config.data.num_classes,
                  expect_num_components=config.model.num_components)
  if multihost.chief_decides('reconstruction exists', path.exists):
    return reconstruction.load_reconstruction(path, **expected).w
  started = time.time()
  label_batches = pipeline.eval_batches(
      builder, config.data, split=config.data.train_split, global_batch_size=config.eval.batch_size,
      pad_size=config.data.eval_pad_size, process_index=jax.process_index(),
      process_count=jax.process_count(), labels_only=True)
  num_batches = -(-builder.info.splits[config.data.train_split].num_examples // config.eval.batch_size)
  if config.train.w_num_images:
    num_batches = min(num_batches, -(-config.train.w_num_images // config.eval.batch_size))
    label_batches = itertools.islice(label_batches, num_batches)
  label_batches = progress.iterate(label_batches, num_batches, 'fitting W', 'batch')
  fit = reconstruction.fit_pca(
      (sharding.to_global({'label': batch['label']}, mesh)['label'] for batch in label_batches),
      ratio=config.model.output_stride, num_classes=config.data.num_classes,
      num_components=config.model.num_components, mesh=mesh, solver=config.train.w_solver)
  logging.info('Fitted W (%d x %d) from %d label windows in %.1fs.', *fit.w.shape, fit.num_windows,
               time.time() - started)
  multihost.chief_decides('reconstruction written', lambda: reconstruction.save_reconstruction(path, fit))
  return reconstruction.load_reconstruction(path, **expected).w  # the one written copy, on every process


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> dict:
  """Trains (or resumes) the run in `workdir` to config.train.num_steps; returns the last eval metrics."""
  workdir = storage.path(workdir)
  xla_options.apply(config, workdir)  # before jax starts its backends and compiles
  logging.info('Process %d of %d; %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  check_before_start(config, workdir)
  is_chief = jax.process_index() == 0
  multihost.chief_decides('config recorded', lambda: _record_or_check_config(workdir, config))

  writer = event_writer.metric_writer(workdir, just_logging=not is_chief)
  mesh = sharding.make_mesh(config.mesh)
  # Process 0 builds the dataset (minutes from real archives) while the others wait; then all open it.
  builder = multihost.chief_first('dataset prepared', lambda: datasets.prepare(config.data))

  source = fine_tune.open_source(config, workdir, mesh)  # None unless train.init_from starts this run
  fitted_w = fit_or_load_w(config, workdir, builder, mesh)
  state, shardings = train_state.create_train_state(config, fitted_w, mesh)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  restored = checkpoint.restore_train_state(manager, state, shardings)
  step = 0
  if restored is not None:
    state, step = restored
    logging.info('Resumed from %s at step %d.', manager.directory, step)
  elif source is not None:
    state = source.initialise(state, shardings)

  train_step = make_train_step(mesh, shardings)
  num_steps = config.train.num_steps
  eval_metrics: dict = {}
  if step >= num_steps:
    logging.info('Training already complete (step %d of %d).', step, num_steps)
    manager.close()
    return eval_metrics

  batches = pipeline.train_batches(
      builder, config.data, split=config.data.train_split, global_batch_size=config.train.batch_size,
      seed=config.seed, start_step=step, process_index=jax.process_index(), process_count=jax.process_count())
  first_batch = sharding.to_global(next(batches), mesh)
  compiled = train_step.lower(state, first_batch).compile()
  flops_per_step = throughput.step_flops(compiled)
  peak = throughput.resolve_peak_flops(config.train.peak_flops)
  learning_rate = train_state.learning_rate_schedule(config)
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  watcher = preemption.Watcher()
  profiler = profiling.StepProfiler(config.train.profile_steps, workdir, start_step=step)
  pending_checks: list[tuple[jax.Array, jax.Array]] = []
  last_log = (time.time(), step)
  batch = first_batch
  try:
    while step < num_steps:
      profiler.before_step(step + 1, state)
      state, step_metrics = compiled(state, batch)
      step += 1
      profiler.after_step(step, (state, step_metrics))
      pending_checks.append((step_metrics['loss'], step_metrics['finite']))
      report_progress(step)
      is_last = step == num_steps
      stopping = watcher.should_stop(step)
      if step % config.train.log_every == 0 or is_last or stopping or step % config.train.checkpoint_every == 0:
        _check_finite(pending_checks, step, manager)
        pending_checks = []
        if step % config.train.log_every == 0 or is_last:
          now = time.time()
          seconds_per_step = (now - last_log[0]) / max(step - last_log[1], 1)
          last_log = (now, step)
          writer.write_scalars(step, {
              'train/loss': float(step_metrics['loss']), 'train/grad_norm': float(step_metrics['grad_norm']),
              'train/learning_rate': float(learning_rate(step)),
              'train/images_per_second': config.train.batch_size / seconds_per_step,
              'train/model_flops_per_second': flops_per_step / seconds_per_step,
              'train/mfu': throughput.mfu(flops_per_step, seconds_per_step, mesh.size, peak)})
      if step % config.train.checkpoint_every == 0 or is_last or stopping:
        checkpoint.save(manager, step, state)
      if stopping:
        checkpoint.finish(manager)
        logging.warning('Stopped at step %d on a preemption notice (checkpoint saved); rerun the same '
                        'command to resume.', step)
        raise preemption.Preempted(step)
      if step % config.train.eval_every == 0 or is_last:
        with report_progress.timed('eval'):
          eval_metrics = evaluate.evaluate_model(state.eval_model(), config, mesh, builder,
                                                 num_images_to_log=config.eval.num_images_to_log)
        _write_eval(writer, step, eval_metrics, config)
      if not is_last:
        batch = sharding.to_global(next(batches), mesh)
  finally:
    watcher.close()
    checkpoint.finish(manager)
    manager.close()
    writer.flush()
    profiler.close()  # last: a trace that cannot be written never keeps a checkpoint from finishing
  return eval_metrics


def check_before_start(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """What can be checked before any data is built or W fitted: the model config, batch sizes that
  split over this job's devices, and a workdir every process can write to. Each failure is one
  message naming the key or path and a value that works."""
  config_checks.validate_model(config)
  profiling.check_steps(config.train.profile_steps)
  if config.train.w_solver not in reconstruction.SOLVERS:
    raise ValueError(f'config.train.w_solver={config.train.w_solver!r}: use one of {reconstruction.SOLVERS}.')
  devices = jax.device_count()
  for section, name in (('train', 'batch_size'), ('eval', 'batch_size')):
    value = config[section][name]
    if value < 1 or value % devices:
      raise ValueError(f'config.{section}.{name}={value} does not split over the {devices} devices of this job: '
                       f'pass --config.{section}.{name}={devices * max(1, -(-value // devices))} '
                       f'(a multiple of {devices}).')
  checkpoint.check_writable(workdir)


def _record_or_check_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Records the run's config in a new workdir (refuses to resume one recorded with another) and the
  versions of the code and libraries that run it."""
  if (workdir / checkpoint.CONFIG_FILE).exists():
    checkpoint.check_resumable(workdir, config)
  else:
    checkpoint.save_config(workdir, config)
  checkpoint.record_versions(workdir)


def _check_finite(checks: list[tuple[jax.Array, jax.Array]], step: int, manager: Any) -> None:
  """Raises if any step since the last check produced a NaN/Inf loss or parameters."""
  finite = np.array([bool(ok) for _, ok in checks])
  if not finite.all():
    first_bad = int(np.argmin(finite))
    bad_step = step - len(checks) + first_bad + 1
    raise NonFiniteLossError(
        f'The loss or the parameters became NaN/Inf at step {bad_step} (loss {float(checks[first_bad][0])}). '
        f'Training stopped; the last good checkpoint (step {manager.latest_step()}) in {manager.directory} is '
        'kept. Lower config.train.learning_rate or check the data, then rerun to resume from it.')


def _write_eval(writer: metric_writers.MetricWriter, step: int, result: dict,
                config: ml_collections.ConfigDict) -> None:
  names = datasets.class_names(config.data)
  scalars = {'eval/miou': result['miou'], 'eval/pixel_accuracy': result['pixel_accuracy']}
  scalars.update({f'eval/iou/{name}': iou for name, iou in zip(names, result['per_class_iou'])
                  if not np.isnan(iou)})
  writer.write_scalars(step, scalars)
  if 'images' in result:
    writer.write_images(step, {'eval/image_truth_prediction': result['images']})
  logging.info('Evaluation at step %d on %s:\n%s', step, config.data.eval_split,
               metrics.format_table(result, names))
