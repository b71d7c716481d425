"""The W file (`reconstruction.npz` in a workdir): written atomically, read back with checks."""
import numpy as np

from dunet_jax import storage
from dunet_jax.reconstruction.solvers import ReconstructionFit


def save_reconstruction(path: storage.PathLike, fit: ReconstructionFit) -> None:
  """Writes `reconstruction.npz` (w, eigenvalues, ratio, num_classes, num_components, num_windows)."""
  path = storage.path(path)
  temporary = path.with_name(path.name + '.tmp.npz')
  with temporary.open('wb') as file:
    np.savez(file, w=np.asarray(fit.w, np.float32), eigenvalues=np.asarray(fit.eigenvalues, np.float32),
             ratio=fit.ratio, num_classes=fit.num_classes, num_components=fit.num_components,
             num_windows=fit.num_windows)
  temporary.replace(path)


def load_reconstruction(path: storage.PathLike, *, expect_ratio: int | None = None,
                        expect_num_classes: int | None = None,
                        expect_num_components: int | None = None) -> ReconstructionFit:
  """Reads a file of `save_reconstruction` (local or gs://), checking it fits what the caller needs."""
  path = storage.path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No reconstruction file at {path}: fit W first (fit_pca + '
                            f'save_reconstruction), or delete the workdir to start over.')
  try:
    with path.open('rb') as file, np.load(file) as data:
      fields = {key: data[key] for key in ('w', 'eigenvalues', 'ratio', 'num_classes', 'num_components',
                                            'num_windows')}
  except (KeyError, ValueError, OSError) as error:
    raise ValueError(f'{path} is not a valid reconstruction file ({error}); delete it to refit W.') from error
  fit = ReconstructionFit(
      w=fields['w'].astype(np.float32), eigenvalues=fields['eigenvalues'].astype(np.float32),
      num_windows=int(fields['num_windows']), ratio=int(fields['ratio']),
      num_classes=int(fields['num_classes']), num_components=int(fields['num_components']))
  expected = {'ratio': expect_ratio, 'num_classes': expect_num_classes,
              'num_components': expect_num_components}
  mismatched = [f'{key}={getattr(fit, key)} (expected {value})' for key, value in expected.items()
                if value is not None and getattr(fit, key) != value]
  if mismatched:
    raise ValueError(f'{path} was fitted for {", ".join(mismatched)}: delete it to refit W, or use '
                     'a config that matches it.')
  if fit.w.shape != (fit.ratio ** 2 * fit.num_classes, fit.num_components):
    raise ValueError(f'{path}: w has shape {fit.w.shape}, inconsistent with ratio={fit.ratio}, '
                     f'num_classes={fit.num_classes}, num_components={fit.num_components}.')
  return fit
