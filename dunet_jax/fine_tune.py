"""Fine-tuning: a new run that starts from another run's model (config.train.init_from).

`init_from` names a training workdir (its newest checkpoint) or one checkpoint folder
`WORKDIR/checkpoints/<step>`, local or gs://. The new run takes the source's parameters and model
state (BatchNorm statistics, W), not its optimizer state or step: it starts at step 0 with a fresh
optimizer, its own learning-rate schedule and its own data (train_aug -> trainval, COCO -> VOC).

W is kept when the source's classes, output stride and C' are this run's; otherwise it is refitted
on this run's labels (`train.fit_or_load_w`), and the layers whose meaning depends on W (the 1x1
conv to the codes and DUpsample, with T) or whose shape depends on the classes (the bilinear and
DeepLabV3+ classifiers) are re-initialised. Any other difference (another backbone, width, decoder)
is refused, naming the first variable that differs. A workdir that already holds a checkpoint
resumes it and never reads the source: rerunning a fine-tune continues it.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dunet_jax import checkpoint, reconstruction, storage, train_state
from dunet_jax.models import dunet

Path = tuple[Any, ...]


@dataclasses.dataclass
class Source:
  """The source run's model variables (by path, laid out for this run's mesh) and what to keep."""
  location: str
  step: int
  variables: dict[Path, jax.Array]
  reinitialised: tuple[str, ...]  # module paths ('decoder/to_codes', ...) that start afresh
  reason: str                     # why they do ('' when nothing is re-initialised)

  def initialise(self, state: train_state.TrainState,
                 shardings: train_state.TrainState) -> train_state.TrainState:
    """`state` (freshly created: step 0, fresh optimizer) with the source's variables put in.

    The source's arrays are then released (the train step donates them), so that training does not
    hold two models.
    """
    params = nnx.to_flat_state(state.params)
    model_state = nnx.to_flat_state(state.model_state)
    taken = [path for path, _ in [*params, *model_state] if not self._is_reinitialised(path)]

    def take(flat) -> nnx.State:
      return nnx.from_flat_state([
          (path, variable if self._is_reinitialised(path)
           else variable.replace(jnp.asarray(self.variables[path], variable.get_value().dtype)))
          for path, variable in flat])

    modules = sorted({_module(_name(path)) for path in taken})
    logging.info('Fine-tuning from %s (step %d): took %d variables of %s (parameters, BatchNorm statistics%s); '
                 '%s. The optimizer state and the step start afresh.', self.location, self.step, len(taken),
                 ', '.join(modules),
                 ', W' if any(_name(path).endswith('dupsample/w') for path in taken) else '',
                 f're-initialised {", ".join(self.reinitialised)} ({self.reason})' if self.reinitialised
                 else 'W kept from the source (same classes, output stride and C\')')
    state = state.replace(params=take(params), model_state=take(model_state))
    self.variables = {}
    return jax.device_put(state, shardings)

  def _is_reinitialised(self, path: Path) -> bool:
    name = _name(path)
    return any(name == module or name.startswith(module + '/') for module in self.reinitialised)

  def check_fits(self, model: nnx.Module) -> None:
    """Raises ValueError naming the first variable of `model` (abstract is fine) whose path or shape
    differs from the source's outside the re-initialised layers."""
    here = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))}
    differences = {}
    for path in here.keys() | self.variables.keys():
      if self._is_reinitialised(path):
        continue
      if path not in self.variables:
        differences[_name(path)] = 'is not in the source'
      elif path not in here:
        differences[_name(path)] = 'is only in the source'
      elif here[path].shape != self.variables[path].shape:
        differences[_name(path)] = f'has shape {self.variables[path].shape} in the source, {here[path].shape} here'
    if differences:
      first = min(differences)
      raise ValueError(
          f'config.train.init_from={self.location}: the source model does not fit this one: variable {first} '
          f'{differences[first]} ({len(differences)} variables differ). Only the layers that depend on the classes, '
          'the output stride or C\' may differ: fine-tune from a run of the same backbone and decoder, or start '
          'from ImageNet weights with model.pretrained.')


def open_source(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, mesh: Mesh) -> Source | None:
  """The source of a fine-tune starting now in `workdir`; None without init_from or when resuming.

  When W is kept, the source's W is written as this run's `reconstruction.npz` (so that it is
  not refitted, now or on resumption); otherwise this run fits its own.
  """
  location = config.train.get('init_from', '')
  if not location:
    return None
  manager = checkpoint.make_manager(workdir, read_only=True)
  resuming = bool(manager.all_steps())
  manager.close()
  if resuming:
    logging.info('%s holds checkpoints: resuming it; config.train.init_from=%s is not read again.',
                 workdir, location)
    return None
  source_workdir, step = resolve(location)
  source_config = checkpoint.load_config(source_workdir)
  model, _, step = checkpoint.restore_model(source_workdir, step, mesh)
  variables = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))}
  reinitialised, reason = _layers_to_reinitialise(source_config, config)
  source = Source(location=location, step=step, variables=variables, reinitialised=reinitialised, reason=reason)
  source.check_fits(nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes, reconstruction=None,
                                                       rngs=nnx.Rngs(0))))
  if config.model.decoder == 'dupsample':
    _start_w(source_workdir, variables, storage.path(workdir), keep=not reinitialised)
  return source


def resolve(location: str) -> tuple[epath.Path, int | None]:
  """(source workdir, step or None for its newest) of an init_from value."""
  path = storage.path(location)
  if (path / checkpoint.CONFIG_FILE).exists():
    return path, None
  if path.parent.name == checkpoint.CHECKPOINT_DIR and path.name.isdigit() and path.is_dir():
    return path.parent.parent, int(path.name)
  raise FileNotFoundError(
      f'config.train.init_from={location} is neither a training workdir (a folder with {checkpoint.CONFIG_FILE}) '
      f'nor a checkpoint folder WORKDIR/{checkpoint.CHECKPOINT_DIR}/<step>: pass one of those.')


def _layers_to_reinitialise(source: ml_collections.ConfigDict,
                            config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], str]:
  """(module paths that start afresh, why) for a source run's config and this run's."""
  changes = [f'{label} {before} -> {after}' for label, before, after in (
      ('num_classes', source.data.num_classes, config.data.num_classes),
      ('output stride', source.model.output_stride, config.model.output_stride),
      ("C'", source.model.num_components, config.model.num_components)) if before != after]
  if config.model.decoder == 'dupsample':
    if not changes:
      return (), ''
    return ('decoder/to_codes', 'decoder/dupsample'), (
        f'{", ".join(changes)}: W refitted on this run\'s labels, so the codes and T start afresh')
  if source.data.num_classes != config.data.num_classes:
    return ('decoder/classifier',), f'num_classes {source.data.num_classes} -> {config.data.num_classes}'
  return (), ''


def _start_w(source_workdir: epath.Path, variables: dict[Path, jax.Array], workdir: epath.Path, keep: bool) -> None:
  """Decides this run's reconstruction.npz before anything reads it: the source's file with the W its
  checkpoint holds, or none (a W left by an earlier start of this run, perhaps from another source, is
  removed) so that `train.fit_or_load_w` fits one on this run's labels."""
  path = workdir / checkpoint.RECONSTRUCTION_FILE
  if keep:
    w = next(value for key, value in variables.items() if _name(key) == 'decoder/dupsample/w')
    w = np.asarray(multihost_utils.process_allgather(w, tiled=True), np.float32)  # every process takes part
    source_file = source_workdir / checkpoint.RECONSTRUCTION_FILE
    if not source_file.exists():
      raise FileNotFoundError(f'config.train.init_from: {source_file} is missing (the record of the W this run '
                              'keeps from the source): put that run\'s reconstruction.npz back there.')
    fit = dataclasses.replace(reconstruction.load_reconstruction(source_file), w=w)
  if jax.process_index() == 0:
    if keep:
      reconstruction.save_reconstruction(path, fit)
    elif path.exists():
      logging.info('Removing %s, left by an earlier start of this run: W is fitted on this run\'s labels.', path)
      path.unlink()
  multihost_utils.sync_global_devices('fine-tune W decided')


def _name(path: Path) -> str:
  return '/'.join(str(key) for key in path)


def _module(name: str) -> str:
  """The part of the model a variable belongs to, for the log: 'backbone', 'aspp', 'decoder/convs', ..."""
  parts = name.split('/')
  return '/'.join(parts[:2] if parts[0] == 'decoder' else parts[:1])
