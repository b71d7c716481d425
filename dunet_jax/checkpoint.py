"""Orbax checkpoints of a training run, the run's recorded config, and restoring onto any topology.

A workdir holds `config.json` (the config the run was started with), `reconstruction.npz` (W)
and `checkpoints/<step>/` with four items: 'params' and 'model_state' (the model: trainable
parameters; BatchNorm statistics and W), 'opt_state' and 'progress' (the step). Inference
restores only the model items. Restoring builds an abstract target whose shardings are made
for the devices of the restoring process, so a checkpoint written by 8 TPU chips opens on a
laptop CPU. Orbax writes each step to a temporary folder and renames it when complete (on gs://,
which cannot rename, into the step's folder with commit_success.txt written last), so an
interrupted save never looks like a checkpoint; a latest step shown to be corrupt is set aside
with a warning in favour of the previous one, and any other restore failure stops the run.
"""
import contextlib
import errno
import functools
import importlib.metadata
import json
import pathlib
import re
import subprocess
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from dunet_jax import multihost, sharding, storage, train_state
from dunet_jax.models import dunet

CONFIG_FILE = 'config.json'
VERSIONS_FILE = 'versions.json'
# The layout of a workdir's checkpoints and the meaning of its recorded config. Workdirs written
# before it was recorded (commit b1c9a4c and earlier) are format 1. Bump it, with a conversion in
# `upgrade_config` (or on restore), when a change would make older runs restore differently.
CHECKPOINT_FORMAT = 2
LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorstore', 'tensorflow', 'tensorflow-cpu',
             'tensorflow-datasets', 'numpy')
CHECKPOINT_DIR = 'checkpoints'
RECONSTRUCTION_FILE = 'reconstruction.npz'
# Orbax's mark of a finished save on file systems without atomic rename (gs://).
COMMIT_MARKER = 'commit_success.txt'

# Config keys that may differ between a run and its resumption: where files live, how
# often things happen, evaluation settings and the device layout. Everything else changes
# what is trained, so resuming with another value is refused.
RESUMABLE_CHANGES = ('data.manual_dir', 'data.tfds_data_dir', 'data.skip_bad_files',
                     'train.log_every', 'train.eval_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.peak_flops', 'eval.', 'mesh.',
                     'train.compilation_cache_dir', 'train.profile_steps', 'train.deterministic_gpu',
                     'model.require_pretrained',  # a start-time guard; runs recorded before it lack it
                     'train.init_from',  # read only when a run starts: a resumed run never reads its source
                     'train.w_solver')  # read only when W is fitted; a resumed run reads the W it recorded


# Optimisation settings a user may change when resuming (a lower learning rate after a NaN, more
# steps): allowed, with a warning naming them. The poly schedule is a function of the step and
# train.num_steps: with another num_steps a resumed run continues on the new schedule at its step,
# lr * (1 - step / num_steps) ** poly_power, so the learning rate jumps to that value (it is not
# the old remainder stretched); a num_steps at or below the step ends training.
OPTIMISATION_CHANGES = ('train.learning_rate', 'train.num_steps', 'train.poly_power', 'train.weight_decay',
                        'train.momentum')


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a run of another model or config."""


def make_manager(workdir: storage.PathLike, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  if jax.default_backend() == 'cpu':
    _write_replicated_arrays_whole()
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(storage.absolute(workdir) / CHECKPOINT_DIR, options=options,
                               item_names=('params', 'model_state', 'opt_state', 'progress'))


@functools.cache
def _write_replicated_arrays_whole() -> None:
  """orbax splits each replicated array between its replicas so that they write in parallel, which
  compiles a slicing program per array shape (seconds on the first save of even a tiny DUNet); the
  devices of a CPU host share one disk, so there each array is written whole by one replica."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def save(manager: ocp.CheckpointManager, step: int, state: train_state.TrainState) -> None:
  """Starts an asynchronous save of the training state at `step` (every process must call it).

  A previous save that failed for lack of space raises here (see `finish`)."""
  with _clear_disk_full_error(manager):
    manager.save(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardSave(getattr(state, name)) for name in train_state.ARRAY_FIELDS},
        progress=ocp.args.JsonSave({'step': int(step)})))


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the pending save; a full disk ends in one message (the previous checkpoint is intact:
  orbax writes into a temporary folder and only a finished step counts)."""
  with _clear_disk_full_error(manager):
    manager.wait_until_finished()


@contextlib.contextmanager
def _clear_disk_full_error(manager: ocp.CheckpointManager):
  try:
    yield
  except Exception as error:
    cause = error
    while cause is not None and not ('No space left on device' in str(cause) or
                                     getattr(cause, 'errno', None) == errno.ENOSPC):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      raise
    raise OSError(errno.ENOSPC, f'The disk holding {manager.directory} is full: a checkpoint could not be written '
                  f'(the newest complete one, step {manager.latest_step()}, is intact). Free space there or give '
                  'a --workdir with room, then rerun the same command to resume from it.') from error


def restore_train_state(manager: ocp.CheckpointManager, state: train_state.TrainState,
                        shardings: train_state.TrainState) -> tuple[train_state.TrainState, int] | None:
  """`state` with its arrays replaced by the newest readable checkpoint's, laid out with `shardings`.

  Returns None when there is no checkpoint. An unreadable step is set aside (see `restore`).
  """
  target = train_state.abstract(state, shardings)
  restored = restore(manager, {name: getattr(target, name) for name in train_state.ARRAY_FIELDS},
                     set_aside_unreadable=True)
  if restored is None:
    return None
  items, step = restored
  return state.replace(**items), step


def restore(manager: ocp.CheckpointManager, abstract: dict[str, Any], step: int | None = None,
            set_aside_unreadable: bool = False) -> tuple[dict[str, Any], int] | None:
  """Restores the items named in `abstract` from `step`, or from the newest readable step.

  `abstract` maps item names ('params', 'model_state', 'opt_state') to trees of
  jax.ShapeDtypeStruct carrying the target shardings. Returns None when there is no checkpoint.
  Only a step shown to be incomplete or corrupt (see `unreadable_reason`) is passed over for the
  previous one, with the reason logged; with `set_aside_unreadable` (training) it is renamed to
  `<step>.unreadable-<time>` rather than deleted, so that the resumed run can write that step anew.
  Any other failure (an I/O error, a timeout, out of memory, a tree that does not match this
  model) raises and moves nothing. Every process restores; the list of steps and each step's
  verdict are decided once, for all of them (`multihost`).
  """
  steps = multihost.chief_decides('checkpoint steps', lambda: sorted(manager.all_steps(), reverse=True))
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {manager.directory}; available: {sorted(steps)}.')
    steps = [step]
  for candidate in steps:
    restored, verdict, failure = None, {'ok': True}, None
    try:
      restored = manager.restore(candidate, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
    except Exception as error:  # noqa: BLE001 - classified below; anything not shown corrupt is raised
      verdict, failure = _verdict(manager, candidate, error)
    verdicts = multihost.gather(f'restore verdict {candidate}', verdict)
    if failure is not None:
      raise failure
    failed = next((v for v in verdicts if 'error' in v), None)
    if failed is not None:  # on another process: every process stops with it
      raise multihost.rebuild_error(failed)
    reasons = [v['unreadable'] for v in verdicts if 'unreadable' in v]
    if not reasons:
      return {name: restored[name] for name in abstract}, candidate
    if step is not None or candidate == steps[-1]:
      raise IncompatibleCheckpointError(
          f'Checkpoint {manager.directory}/{candidate} is incomplete or corrupt ({reasons[0]}), and there is no '
          'older one to resume from: move it away to start again in this --workdir, or use a fresh --workdir.')
    logging.warning('Checkpoint step %d in %s is incomplete or corrupt (%s); trying the previous one.',
                    candidate, manager.directory, reasons[0])
    if set_aside_unreadable:
      _set_aside(manager, candidate)
  return None


# tensorstore status codes that describe the stored bytes themselves: undecodable, missing, or
# shorter than their metadata says. Others (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
# PERMISSION_DENIED, UNKNOWN, ...) can pass or are the environment's, and are raised.
_CORRUPT_STATUSES = ('DATA_LOSS', 'NOT_FOUND', 'OUT_OF_RANGE')


def unreadable_reason(error: BaseException) -> str | None:
  """Why `error` shows the checkpoint itself to be incomplete or corrupt; None if it does not."""
  while error is not None:
    if isinstance(error, json.JSONDecodeError):
      return f'corrupt metadata: {error}'
    if isinstance(error, FileNotFoundError):
      return f'missing file: {error}'
    status = str(error).split(':', 1)[0]
    if status in _CORRUPT_STATUSES:
      return str(error).split(' [tensorstore_spec', 1)[0]
    error = error.__cause__ or error.__context__
  return None


def _verdict(manager: ocp.CheckpointManager, step: int,
             error: Exception) -> tuple[dict[str, Any], Exception | None]:
  """This process's verdict on a failed restore, for the others, and the error it raises (if any)."""
  reason = unreadable_reason(error)
  if reason is not None:
    return {'unreadable': reason}, None
  if _is_tree_mismatch(error):
    mismatch = IncompatibleCheckpointError(
        f'Checkpoint {manager.directory}/{step} does not fit this model ({error}). It was written by another '
        'model, config or code version: resume it with the code and config that wrote it, or use a fresh --workdir.')
    mismatch.__cause__ = error
    error = mismatch
  return multihost.describe_error(error), error


def _is_tree_mismatch(error: Exception) -> bool:
  text = str(error)
  return 'tree structures do not match' in text or 'is not compatible with the stored shape' in text


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Renames an unreadable step's folder (process 0) so that it is neither used nor lost.

  On gs:// the folder is copied whole, then deleted starting with orbax's commit marker, so a
  crash midway leaves either the step in place or a complete copy beside an unfinished save.
  """

  def move() -> None:
    folder = storage.path(manager.directory) / str(step)
    target = folder.with_name(f'{step}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}')
    storage.move_folder(folder, target, remove_first=COMMIT_MARKER)
    logging.warning('Moved the unreadable checkpoint to %s.', target)

  multihost.chief_decides(f'set aside checkpoint {step}', move)  # the others wait for the move
  manager.reload()


def abstract_with_shardings(tree: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs for `tree` whose shardings fit `mesh` (FSDP rules, else replicated)."""
  return train_state.abstract(tree, sharding.tree_shardings(mesh, tree))


def record_versions(workdir: storage.PathLike) -> None:
  """Appends this start's code and library versions to the workdir's versions.json, which also holds
  its checkpoint format; refuses a workdir written in a format newer than this code reads."""
  path = storage.path(workdir) / VERSIONS_FILE
  recorded = json.loads(path.read_text()) if path.exists() else {'checkpoint_format': CHECKPOINT_FORMAT, 'starts': []}
  if recorded['checkpoint_format'] > CHECKPOINT_FORMAT:
    raise IncompatibleCheckpointError(
        f'{workdir} holds checkpoints in format {recorded["checkpoint_format"]} (see {path}), newer than this '
        f'code reads ({CHECKPOINT_FORMAT}): use the dunet_jax release that wrote it or a newer one.')
  recorded['starts'].append({'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'dunet_jax': code_version(),
                             'libraries': {name: version for name in LIBRARIES
                                           if (version := _installed_version(name)) != 'not installed'}})
  path.write_text(json.dumps(recorded, indent=2))


def code_version() -> str:
  """dunet_jax's installed version, and the git commit of its checkout when it runs from one."""
  version = _installed_version('dunet_jax')
  commit = subprocess.run(['git', '-C', str(pathlib.Path(__file__).parent), 'rev-parse', 'HEAD'],
                          capture_output=True, text=True, check=False).stdout.strip()
  return f'{version} (git {commit})' if commit else version


def _installed_version(distribution: str) -> str:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def _flatten(config: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def check_writable(folder: storage.PathLike, flag: str = '--workdir') -> None:
  """Creates `folder` if needed and writes (then removes) a file in it: a folder a run or an
  evaluation could not write to is refused before any work, naming the flag."""
  folder = storage.path(folder)
  probe = folder / f'.write_test.{jax.process_index()}'
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as error:
    raise PermissionError(f'{flag}={folder} cannot be written ({error}): pass a folder this job can create '
                          'and write.') from error


def save_config(workdir: storage.PathLike, config: ml_collections.ConfigDict) -> None:
  """Records a new run's config, and the checkpoint format its workdir is written in."""
  versions = storage.path(workdir) / VERSIONS_FILE
  if not versions.exists():
    versions.write_text(json.dumps({'checkpoint_format': CHECKPOINT_FORMAT, 'starts': []}, indent=2))
  (storage.path(workdir) / CONFIG_FILE).write_text(config.to_json(indent=2))


def load_config(workdir: storage.PathLike) -> ml_collections.ConfigDict:
  """The run's recorded config in this release's terms (see `upgrade_config`)."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {workdir} is not a dunet_jax workdir (it has no recorded config). '
                            'Pass the --workdir of a training run.')
  return upgrade_config(json.loads(path.read_text()), recorded_format(workdir))


def recorded_format(workdir: storage.PathLike) -> int:
  """The checkpoint format a workdir was written in (1: before formats were recorded)."""
  path = storage.path(workdir) / VERSIONS_FILE
  return json.loads(path.read_text())['checkpoint_format'] if path.exists() else 1


def upgrade_config(recorded: dict, checkpoint_format: int) -> ml_collections.ConfigDict:
  """A config recorded by an earlier release, in this release's terms: keys that were renamed or
  removed are converted, and keys added since take their defaults (configs/default.py).

  Format 1 (up to commit b1c9a4c): a ResNet feature 'bXuYc3' was the unit's output, which is
  now 'bXuY' ('bXuYc3' became BN(conv3) before the residual add); `data.ignore_label` was a key.
  """
  from configs import default
  recorded = json.loads(json.dumps(recorded))
  if checkpoint_format < 2:
    recorded['data'].pop('ignore_label', None)
    if recorded['model'].get('backbone', 'resnet') == 'resnet':
      recorded['model']['fuse_features'] = [re.sub(r'^(b\d+u\d+)c3$', r'\1', name)
                                            for name in recorded['model'].get('fuse_features', [])]
  config = default.get_config()
  unknown = sorted(set(_flatten(recorded)) - set(_flatten(config_to_dict(config))))
  if unknown:
    raise IncompatibleCheckpointError(
        f'The recorded config has keys this release does not know ({", ".join(unknown)}): it was written by '
        'a newer dunet_jax; use that release.')
  config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value
                                     for key, value in _flatten(recorded).items()})
  return config


def check_resumable(workdir: storage.PathLike, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose recorded config differs in anything that changes what is trained;
  warns about changed optimisation settings (OPTIMISATION_CHANGES)."""
  recorded = _flatten(config_to_dict(load_config(workdir)))
  current = _flatten(config_to_dict(config))
  changed = sorted(key for key in recorded.keys() | current.keys()
                   if recorded.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES))
  allowed = [key for key in changed if key in OPTIMISATION_CHANGES]
  if allowed:
    logging.warning('Resuming %s with changed optimisation settings: %s.', workdir,
                    '; '.join(f'{key}: {recorded.get(key)!r} -> {current.get(key)!r}' for key in allowed))
  refused = [key for key in changed if key not in OPTIMISATION_CHANGES]
  if refused:
    details = '; '.join(f'{key}: recorded {recorded.get(key)!r}, now {current.get(key)!r}' for key in refused)
    flags = ' '.join(f'--config.{key}={_flag_value(recorded.get(key))}' for key in refused)
    raise IncompatibleCheckpointError(
        f'{workdir} holds a run with another config ({details}). To resume it, pass {flags} (its recorded '
        f'values, from {storage.path(workdir) / CONFIG_FILE}); or start a new run in a fresh --workdir.')


def _flag_value(value: Any) -> str:
  """`value` written the way --config.key=VALUE accepts it (tuples in parentheses)."""
  if isinstance(value, (list, tuple)):
    return '"(' + ','.join(repr(item) for item in value) + (',' if len(value) == 1 else '') + ')"'
  return str(value)


def restore_model(workdir: storage.PathLike, step: int | None = None,
                  mesh: Mesh | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """The trained model of a workdir, in eval mode, on this process's devices (replicated)."""
  config = load_config(workdir)
  mesh = mesh or sharding.data_parallel_mesh()
  abstract_model = nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes,
                                                      reconstruction=None, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = train_state.split_model(abstract_model)
  manager = make_manager(workdir, read_only=True)
  restored = restore(manager, {'params': abstract_with_shardings(params, mesh),
                               'model_state': abstract_with_shardings(model_state, mesh)}, step)
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {storage.path(workdir) / CHECKPOINT_DIR}: train first with '
                            f'python -m dunet_jax.main --workdir={workdir}.')
  items, restored_step = restored
  model = nnx.merge(graphdef, items['params'], items['model_state'])
  model.eval()
  return model, config, restored_step

