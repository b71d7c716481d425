"""W = the top C' eigenvectors of the window moment M, and the W-fitting entry point `fit_pca`.

W (N, C') holds the top C' eigenvectors of M; codes are x = W^T v and the reconstruction is W x (the
paper's P = W^T, closed form under orthogonality). The exact solver assembles M and calls LAPACK's
eigh; the randomized one (subspace iteration with Rayleigh-Ritz, float64) only uses products M X,
which are cheap sums of block products, and never forms the N x N matrix. Each eigenvector's sign is
fixed (largest-magnitude entry positive) so W is reproducible.
"""
import dataclasses
import warnings
from collections.abc import Callable, Iterable

import jax
import numpy as np
import scipy.linalg
from jax.sharding import Mesh

from dunet_jax.reconstruction.moments import WindowMoments, accumulate_moments

# solver='auto' uses eigh up to this N = r*r*C (VOC's 21 classes up to r = 16, N = 5,376; Context's 60
# up to r = 8): exact and a dense M of at most 300 MB. Subspace iteration above.
EXACT_MAX_SIZE = 6144
SOLVERS = ('auto', 'exact', 'randomized')


@dataclasses.dataclass(frozen=True)
class ReconstructionFit:
  """W (N, C') float32 and what it was fitted on; eigenvalues are those of M / num_windows."""
  w: np.ndarray
  eigenvalues: np.ndarray
  num_windows: int
  ratio: int
  num_classes: int
  num_components: int


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
  """Flips each column so that its largest-magnitude entry is positive."""
  largest = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
  return vectors * np.where(largest < 0, -1.0, 1.0)


def pick_solver(size: int) -> str:
  """'exact' (LAPACK eigh of the dense M) up to N = EXACT_MAX_SIZE, 'randomized' above."""
  return 'exact' if size <= EXACT_MAX_SIZE else 'randomized'


def subspace_iteration(matmul: Callable[[np.ndarray], np.ndarray], size: int, num_components: int, *,
                       oversample: int, max_iters: int, tol: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray, float]:
  """Top eigenpairs of a symmetric PSD operator by block power iteration with Rayleigh-Ritz (float64).

  Stops when every wanted Ritz pair's residual ||M u - theta u|| is below tol times the smallest
  wanted Ritz value (the tail's eigenvalues are 1e-4..1e-5 of the largest and nearly equal, so a
  tolerance relative to the largest would leave the last vectors loose); a floor of 1e-12 times
  the largest stops a rank-deficient M waiting for zero residuals. Returns the eigenvalues, the
  vectors, and the final relative residual (max residual / smallest wanted Ritz value).
  """
  width = min(size, num_components + oversample)
  basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, width)))
  for _ in range(max_iters):
    product = matmul(basis)
    values, rotation = np.linalg.eigh(basis.T @ product)
    values, rotation = values[::-1], rotation[:, ::-1]
    basis, product = basis @ rotation, product @ rotation
    residual = np.linalg.norm(product[:, :num_components] - basis[:, :num_components] * values[:num_components],
                              axis=0).max()
    scale = max(values[num_components - 1], 1e-12 * values[0])
    if residual <= tol * scale:
      break
    basis, _ = np.linalg.qr(product)
  return values[:num_components], basis[:, :num_components], float(residual / scale)


def solve_moments(moments: WindowMoments, num_components: int, *, solver: str = 'auto',
                  oversample: int | None = None, max_iters: int = 200, tol: float = 1e-3,
                  seed: int = 0) -> ReconstructionFit:
  """W = the top `num_components` eigenvectors of M ('exact': eigh; 'randomized': subspace iteration).

  A randomized solve that has not reached `tol` after `max_iters` warns (RuntimeWarning) with the
  residual it reached, rather than returning a loose W silently.
  """
  size = moments.size
  if not 0 < num_components <= size:
    raise ValueError(f'num_components={num_components} must be in 1..r*r*C={size}.')
  if moments.num_windows == 0:
    raise ValueError('No label window has a non-void pixel: cannot fit W (check the label files).')
  if solver == 'auto':
    solver = pick_solver(size)
  if solver == 'exact':
    values, vectors = scipy.linalg.eigh(moments.dense(), subset_by_index=(size - num_components, size - 1),
                                        overwrite_a=True, check_finite=False)
    values, vectors = values[::-1], vectors[:, ::-1]
  elif solver == 'randomized':
    values, vectors, residual = subspace_iteration(
        moments.matmul, size, num_components, oversample=num_components if oversample is None else oversample,
        max_iters=max_iters, tol=tol, seed=seed)
    if residual > tol:
      warnings.warn(f'W did not converge: after max_iters={max_iters} subspace iterations the largest '
                    f'eigen-residual is {residual:.2g} of the smallest wanted eigenvalue (tol={tol:g}); '
                    f"its last vectors may be loose. Use solver='exact' (N={size}) or more max_iters.",
                    RuntimeWarning, stacklevel=2)
  else:
    raise ValueError(f"solver={solver!r} must be 'exact', 'randomized' or 'auto'.")
  return ReconstructionFit(
      w=_fix_signs(vectors).astype(np.float32),
      eigenvalues=(values / moments.num_windows).astype(np.float32),
      num_windows=moments.num_windows, ratio=moments.ratio, num_classes=moments.num_classes,
      num_components=num_components)


def fit_pca(label_batches: Iterable[np.ndarray | jax.Array], *, ratio: int, num_classes: int,
            num_components: int, mesh: Mesh | None = None, solver: str = 'auto',
            **solver_options) -> ReconstructionFit:
  """W from one streaming pass over label batches (see `accumulate_moments` and `solve_moments`)."""
  moments = accumulate_moments(label_batches, ratio=ratio, num_classes=num_classes, mesh=mesh)
  return solve_moments(moments, num_components, solver=solver, **solver_options)


def reconstruction_error(moments: WindowMoments, w: np.ndarray) -> float:
  """Mean over windows of ||v - W W^T v||^2 = (tr M - tr(W^T M W)) / windows, for orthonormal W."""
  w = np.asarray(w, np.float64)
  captured = float(np.sum(w * moments.matmul(w)))
  return (moments.trace() - captured) / moments.num_windows
