"""Flax NNX networks: backbones, DUpsample, decoders and the assembled DUNet."""
