"""The inference function as serialized StableHLO (jax.export), runnable without the model code; CLI.

  python -m dunet_jax.export --workdir=RUN --output=model.jaxexport
      [--height=H --width=W | --symbolic] [--batch_size=1] [--platforms=cpu,cuda,tpu]

The file is lowered for every platform in --platforms (default cpu, cuda and tpu), whatever machine
exports it: export on a laptop, serve on a GPU or TPU machine. jax lowers for a platform without its
backend being installed; `--platforms=cuda` narrows the file to one.

The exported function maps uint8 images (B, H, W, 3) to float32 logits (B, H, W, num_classes)
(argmax over the last axis gives the label map); the weights are embedded as constants. With
--symbolic, B, H and W are symbolic, so one file serves every image size. Reload with:

  from dunet_jax.export import load_exported   # or jax.export.deserialize(bytes) directly
  logits = load_exported('model.jaxexport')(images)
"""
from dunet_jax import cli  # first: prepares the process before TensorFlow and jax load

from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx

from dunet_jax import checkpoint
from dunet_jax import inference
from dunet_jax import storage

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def export_model(model: nnx.Module, *, height: int | None = None, width: int | None = None,
                 batch_size: int | None = 1, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 ) -> jax.export.Exported:
  """jax.export of model(images) for a fixed (height, width), or symbolic sizes where None,
  lowered for each of `platforms`.

  The weights are copied to the host first, so the export runs on one device whatever mesh the
  model's arrays live on.
  """
  model.eval()
  graphdef, state = nnx.split(model)
  state = jax.device_get(state)
  names = ('batch' if batch_size is None else batch_size, 'height' if height is None else height,
           'width' if width is None else width)
  shape = jax.export.symbolic_shape(', '.join(str(name) for name in names) + ', 3',
                                    constraints=[f'{name} >= 1' for name in names if isinstance(name, str)])
  forward = jax.jit(lambda images: nnx.merge(graphdef, state)(images))
  return jax.export.export(forward, platforms=tuple(platforms))(jax.ShapeDtypeStruct(shape, np.uint8))


def save_exported(exported: jax.export.Exported, path: storage.PathLike) -> None:
  storage.path(path).write_bytes(exported.serialize())


def load_exported(path: storage.PathLike) -> Callable[[np.ndarray], jax.Array]:
  """The exported function of a file: uint8 images (B, H, W, 3) -> float32 logits."""
  path = storage.path(path)
  try:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
  except OSError as error:
    raise FileNotFoundError(f'{path} cannot be read ({error}).') from error
  except Exception as error:  # noqa: BLE001 - flatbuffers raise assorted errors on foreign bytes
    raise ValueError(f'{path} is not a jax.export file ({error}); write one with '
                     'python -m dunet_jax.export.') from error
  return exported.call


def define_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training run directory (or <run>/checkpoints/<step>).',
                      required=True, flag_values=options)
  flags.DEFINE_string('output', None, 'File to write the serialized function to.', required=True,
                      flag_values=options)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).', flag_values=options)
  flags.DEFINE_integer('height', None, 'Fixed input height (with --width).', flag_values=options)
  flags.DEFINE_integer('width', None, 'Fixed input width (with --height).', flag_values=options)
  flags.DEFINE_bool('symbolic', False, 'Symbolic batch, height and width: any image size.', flag_values=options)
  flags.DEFINE_integer('batch_size', 1, 'Fixed batch size (ignored with --symbolic).', flag_values=options)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS), 'Platforms to lower for; the file runs on any '
                    'of them, whatever machine exports it.', flag_values=options)


def main(options: flags.FlagValues) -> None:
  fixed = options.height is not None and options.width is not None
  if options.symbolic == fixed or (options.height is None) != (options.width is None):
    raise ValueError('pass either --height and --width (a fixed size) or --symbolic (any size).')
  workdir, path_step = inference.resolve_checkpoint(options.workdir)
  model, _, _ = checkpoint.restore_model(workdir, options.step if options.step is not None else path_step)
  exported = export_model(model, height=options.height, width=options.width,
                          batch_size=None if options.symbolic else options.batch_size,
                          platforms=options.platforms)
  if jax.process_index() > 0:  # every process restored the model; process 0 writes the file
    return
  save_exported(exported, options.output)
  print(f'wrote {options.output}: {exported.in_avals[0]} -> {exported.out_avals[0]} '
        f'for {", ".join(exported.platforms)}')


if __name__ == '__main__':
  cli.run(main, define_flags, join=True)
