"""dunet_jax: DUNet (DUpsampling, Tian et al., CVPR 2019) in JAX / Flax NNX."""
# Chooses the I/O layer for gs:// paths before anything reads or writes one (see storage.py).
from dunet_jax import storage  # noqa: F401
