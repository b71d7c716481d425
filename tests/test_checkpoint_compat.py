"""Checkpoints written by an earlier release still open: tests/data/checkpoint_b1c9a4c is a training
workdir written by commit b1c9a4c (the release before checkpoint formats were recorded), made with

  git worktree add /tmp/old b1c9a4c && cd /tmp/old && python -m dunet_jax.main \
    --config=configs/synthetic.py:test --workdir=RUN --config.model.base_width=2 \
    --config.model.decoder_channels=4 --config.model.fuse_channels=2 --config.model.num_components=4 \
    --config.model.output_stride=8 --config.train.num_steps=2 --config.train.checkpoint_every=2 \
    --config.train.keep_checkpoints=1 --config.train.eval_every=1000 (+ data dirs)

(config.json, reconstruction.npz and checkpoints/ of RUN), and expected_logits.npz holds that
code's output for one image (every 8th pixel), computed by its own checkpoint.restore_model.
"""
import pathlib

import numpy as np

from dunet_jax import checkpoint

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'checkpoint_b1c9a4c'


def test_checkpoint_of_the_previous_release_restores_and_predicts_the_same():
  model, config, step = checkpoint.restore_model(FIXTURE)
  assert step == 2 and config.model.num_components == 4
  expected = np.load(FIXTURE / 'expected_logits.npz')
  logits = np.asarray(model(expected['image']))[:, ::8, ::8]
  np.testing.assert_allclose(logits, expected['logits'], rtol=1e-5, atol=1e-5)
