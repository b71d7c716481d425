"""Orbax checkpoints of a training run, the run's recorded config, and restoring onto any topology.

A workdir holds `config.json` (the config the run was started with), `reconstruction.npz` (W)
and `checkpoints/<step>/` with four items: 'params' and 'model_state' (the model: trainable
parameters; BatchNorm statistics and W), 'opt_state' and 'progress' (the step). Inference
restores only the model items. Restoring builds an abstract target whose shardings are made
for the devices of the restoring process, so a checkpoint written by 8 TPU chips opens on a
laptop CPU. Orbax writes each step to a temporary folder and renames it when complete (on gs://,
which cannot rename, into the step's folder with commit_success.txt written last), so an
interrupted save never looks like a checkpoint; a complete but unreadable latest step is
skipped with a warning in favour of the previous one.
"""
import json
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dunet_jax import sharding, storage, train_state
from dunet_jax.models import dunet

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
RECONSTRUCTION_FILE = 'reconstruction.npz'
# Orbax's mark of a finished save on file systems without atomic rename (gs://).
COMMIT_MARKER = 'commit_success.txt'

# Config keys that may differ between a run and its resumption: where files live, how
# often things happen, evaluation settings and the device layout. Everything else changes
# what is trained, so resuming with another value is refused.
RESUMABLE_CHANGES = ('data.manual_dir', 'data.tfds_data_dir', 'data.skip_bad_files',
                     'train.num_steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.peak_flops', 'eval.', 'mesh.',
                     'model.require_pretrained',  # a start-time guard; runs recorded before it lack it
                     'train.init_from')  # read only when a run starts: a resumed run never reads its source


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a run of another model or config."""


def make_manager(workdir: storage.PathLike, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(storage.absolute(workdir) / CHECKPOINT_DIR, options=options,
                               item_names=('params', 'model_state', 'opt_state', 'progress'))


def save(manager: ocp.CheckpointManager, step: int, state: train_state.TrainState) -> None:
  """Starts an asynchronous save of the training state at `step` (every process must call it)."""
  manager.save(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardSave(getattr(state, name)) for name in train_state.ARRAY_FIELDS},
      progress=ocp.args.JsonSave({'step': int(step)})))


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
  With `set_aside_unreadable` (training), an unreadable step is renamed to
  `<step>.unreadable-<time>` rather than deleted, so that the resumed run can write that step anew.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {manager.directory}; available: {sorted(steps)}.')
    steps = [step]
  for candidate in steps:
    try:
      restored = manager.restore(candidate, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
    except Exception as error:  # noqa: BLE001 - any unreadable step falls back to the previous one
      if step is not None or candidate == steps[-1]:
        raise IncompatibleCheckpointError(
            f'Checkpoint {manager.directory}/{candidate} cannot be restored into this model ({error}). '
            'It was written by another model or config, or it is corrupt: use a fresh --workdir.') from error
      logging.warning('Checkpoint step %d in %s is unreadable (%s); trying the previous one.',
                      candidate, manager.directory, error)
      if set_aside_unreadable:
        _set_aside(manager, candidate)
      continue
    return {name: restored[name] for name in abstract}, candidate
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
  """Renames an unreadable step's folder (process 0) so that it is neither used nor lost.

  On gs:// the folder is copied whole, then deleted starting with orbax's commit marker, so a
  crash midway leaves either the step in place or a complete copy beside an unfinished save.
  """
  if jax.process_index() == 0:
    folder = storage.path(manager.directory) / str(step)
    target = folder.with_name(f'{step}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}')
    storage.move_folder(folder, target, remove_first=COMMIT_MARKER)
    logging.warning('Moved the unreadable checkpoint to %s.', target)
  multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
  manager.reload()


def abstract_with_shardings(tree: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs for `tree` whose shardings fit `mesh` (FSDP rules, else replicated)."""
  return train_state.abstract(tree, sharding.tree_shardings(mesh, tree))


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


def save_config(workdir: storage.PathLike, config: ml_collections.ConfigDict) -> None:
  (storage.path(workdir) / CONFIG_FILE).write_text(config.to_json(indent=2))


def load_config(workdir: storage.PathLike) -> ml_collections.ConfigDict:
  path = storage.path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {workdir} is not a dunet_jax workdir (it has no recorded config). '
                            'Pass the --workdir of a training run.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_resumable(workdir: storage.PathLike, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose recorded config differs in anything that changes training."""
  recorded = _flatten(config_to_dict(load_config(workdir)))
  current = _flatten(config_to_dict(config))
  differing = sorted(key for key in recorded.keys() | current.keys()
                     if recorded.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES))
  if differing:
    details = '; '.join(f'{key}: recorded {recorded.get(key)!r}, now {current.get(key)!r}' for key in differing)
    raise IncompatibleCheckpointError(
        f'{workdir} holds a run with another config ({details}). Resume with the recorded config '
        f'({storage.path(workdir) / CONFIG_FILE}) or start a new run in a fresh --workdir.')


def restore_model(workdir: storage.PathLike, step: int | None = None,
                  mesh: Mesh | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """The trained model of a workdir, in eval mode, on this process's devices (replicated)."""
  config = load_config(workdir)
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))
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

