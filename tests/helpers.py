"""Helpers that several test modules share: the repository root, README's tables, dataset folders
and archives written from bytes, a per-image reference for test-time augmentation, and a tiny DUNet
(random, or saved as a sharded run).

Test modules import them from here (`from helpers import ...`), never from one another; the
session-wide tiny run is the `tiny_run` fixture of conftest.py.
"""
import io
import pathlib
import re
import runpy
import sys
import tarfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (REPO_ROOT / 'README.md').read_text()


def readme_table_rows(heading: str) -> list[str]:
  """First cells of the markdown table that follows the first line starting with `heading`."""
  lines = README[README.index(heading):].splitlines()[1:]
  rows, started = [], False
  for line in lines:
    if line.startswith('|'):
      started = True
      rows.append(line.split('|')[1].strip())
    elif started:
      break
  return rows[2:]  # the header row and its --- line


def documented_tools() -> list[str]:
  """'main', 'data.prepare', ... for every `python -m dunet_jax.<tool>` row of the command table."""
  return [re.match(r'`python -m dunet_jax\.([\w.]+)', cell).group(1)
          for cell in readme_table_rows('## Commands')]


def write_tree(root: pathlib.Path, files: dict[str, bytes]) -> None:
  """Writes {relative path: bytes} under `root`, as an extracted dataset folder."""
  for relpath, data in files.items():
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_bytes(data)


def write_tar(path: pathlib.Path, prefix: str, files: dict[str, bytes], mode: str) -> None:
  """The same files as a tar archive (mode 'w' or 'w:gz'), each name under `prefix`."""
  with tarfile.open(path, mode) as tar:
    for relpath, data in files.items():
      info = tarfile.TarInfo(prefix + relpath)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def numpy_softmax(logits: np.ndarray) -> np.ndarray:
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def reference_probabilities(image: np.ndarray, scales, flip: bool, logits_fn) -> np.ndarray:
  """One image (H, W, 3): resize, predict, mirror, softmax, resize back, average, in a loop."""
  height, width, _ = image.shape
  outputs = []
  for scale in scales:
    size = (int(round(height * scale)), int(round(width * scale)))
    scaled = np.asarray(jax.image.resize(image.astype(np.float32), (*size, 3), 'linear'))
    for mirrored in [False, True][:2 if flip else 1]:
      inputs = scaled[:, ::-1] if mirrored else scaled
      logits = np.asarray(logits_fn(jnp.asarray(inputs.copy())[None]))[0]
      probabilities = numpy_softmax(logits[:, ::-1] if mirrored else logits)
      outputs.append(np.asarray(jax.image.resize(probabilities, (height, width, logits.shape[-1]),
                                                 'linear')))
  return np.mean(outputs, axis=0)


def random_model(config) -> nnx.Module:
  """A tiny DUNet with He-normal kernels, unit BatchNorm and an orthonormal W, filled in numpy.

  Filling an eval_shape model avoids compiling one initializer per parameter shape, which costs
  far more than the tests that use the model.
  """
  from dunet_jax.models import dunet
  abstract = nnx.eval_shape(lambda: dunet.DUNet(config.model, config.data.num_classes,
                                                reconstruction=None, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = path[-1], leaf.shape
    if name == 'kernel':
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif name == 'w':
      value = np.linalg.qr(rng.normal(size=shape))[0]
    elif name in ('scale', 'var'):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    return jnp.asarray(value, leaf.dtype)

  state = nnx.from_flat_state([(path, variable.replace(fill(path, variable.get_value())))
                               for path, variable in nnx.to_flat_state(state)])
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def save_tiny_run(directory: pathlib.Path, step: int = 5) -> tuple[pathlib.Path, nnx.Module]:
  """(workdir, model): a tiny DUNet saved at `step` in directory/tiny_run with params FSDP-sharded
  over a 4 x 2 mesh of 8 devices; its synthetic data goes to directory/synthetic.

  The model stays in memory (on the 8 devices) as the original run's reference.
  """
  from configs import synthetic
  from dunet_jax import checkpoint, sharding, train_state
  workdir = directory / 'tiny_run'
  config = synthetic.get_config('test')
  config.mesh.data, config.mesh.fsdp = 4, 2
  config.data.manual_dir = str(directory / 'synthetic' / 'manual')
  config.data.tfds_data_dir = str(directory / 'synthetic' / 'tfds')
  model = random_model(config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, model_state = train_state.split_model(model)
  params = jax.device_put(params, sharding.tree_shardings(mesh, params))
  model_state = jax.device_put(model_state, sharding.tree_shardings(mesh, model_state))
  assert any(leaf.sharding.spec != jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(params))
  workdir.mkdir(parents=True)
  checkpoint.save_config(workdir, config)
  manager = checkpoint.make_manager(workdir)
  state = train_state.TrainState(graphdef=graphdef, tx=None, params=params, model_state=model_state,
                                 opt_state={'count': np.zeros((), np.int32)})
  checkpoint.save(manager, step, state)
  manager.wait_until_finished()
  return workdir, nnx.merge(graphdef, params, model_state)


def run_tool(monkeypatch, tool: str, *args: str) -> None:
  """`python -m dunet_jax.<tool> ARGS`, in this process: the module runs as __main__."""
  monkeypatch.setattr(sys, 'argv', [f'dunet_jax.{tool}', *args])
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # runpy: the module was imported as a library too
    runpy.run_module(f'dunet_jax.{tool}', run_name='__main__', alter_sys=False)
