"""dunet_jax: DUNet (DUpsampling, Tian et al., CVPR 2019) in JAX / Flax NNX."""
