"""dunet_jax: DUNet (DUpsampling, Tian et al., CVPR 2019) in JAX / Flax NNX."""
# A `python -m dunet_jax.<tool>` command restarts once with huge pages for its heap (huge_pages.py),
# before anything heavy is imported.
from dunet_jax import huge_pages

huge_pages.reexec_if_a_command()

# Chooses the I/O layer for gs:// paths before anything reads or writes one (see storage.py).
from dunet_jax import storage  # noqa: E402,F401
