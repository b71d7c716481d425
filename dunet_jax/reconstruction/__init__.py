"""The label compression matrix W of DUpsampling, fitted from label maps by PCA.

- `windows`: label maps cut into r x r windows, each classified (uniform / mixed, its classes).
- `moments`: the second moment M of the one-hot windows, accumulated in structured form and summed
  over processes.
- `solvers`: W = top eigenvectors of M (exact or randomized), `fit_pca`, the reconstruction error.
- `files`: the W file of a workdir.
Compressing labels with W and the SGD alternative live with their only user, `dunet_jax.upper_bound`.
"""
from dunet_jax.reconstruction.files import load_reconstruction, save_reconstruction
from dunet_jax.reconstruction.moments import WindowMoments, accumulate_moments
from dunet_jax.reconstruction.solvers import (SOLVERS, ReconstructionFit, fit_pca, reconstruction_error,
                                              solve_moments)

__all__ = ['SOLVERS', 'ReconstructionFit', 'WindowMoments', 'accumulate_moments', 'fit_pca', 'load_reconstruction',
           'reconstruction_error', 'save_reconstruction', 'solve_moments']
