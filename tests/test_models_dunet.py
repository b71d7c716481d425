"""DUNet end to end at tiny sizes: any input size, temperature, every voc.py preset builds and trains."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import voc
from dunet_jax.models.dunet import DUNet, build_backbone
from helpers import random_model

NUM_CLASSES = 21


def _model(preset: str) -> DUNet:
  """The preset's tiny DUNet with random He-normal kernels and an orthonormal W, filled in numpy.

  Built abstractly (every module constructor runs) and filled without compiling one initializer
  per parameter shape, which took most of these tests' time.
  """
  config = voc.get_config(preset + ',tiny')
  assert config.data.num_classes == NUM_CLASSES
  return random_model(config)


@jax.jit(static_argnums=0)
def _apply(graph, state, images):
  return nnx.merge(graph, state, copy=True)(images)


def _forward(model: DUNet, images: jax.Array) -> jax.Array:
  return _apply(*nnx.split(model), images)


def test_odd_sizes_and_uint8_give_float32_logits_of_the_input_size():
  model = _model('r50_os16_b1u2c3')
  model.eval()
  images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 65, 97, 3)), jnp.uint8)
  logits = _forward(model, images)
  assert logits.shape == (2, 65, 97, NUM_CLASSES) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(_forward(model, images.astype(jnp.float32))),
                             np.asarray(logits), rtol=1e-6)
  model.decoder.dupsample.log_temperature[...] = jnp.log(2.0)
  np.testing.assert_allclose(np.asarray(_forward(model, images)), np.asarray(logits) / 2,
                             rtol=1e-5, atol=1e-6)


# Xception's tiny presets train end to end in tests/test_documented_commands.py.
@pytest.mark.parametrize('preset', ['r50_os16_conv1_3_b3u6c3', 'r50_os32_bilinear', 'r101_os8_deeplabv3plus'])
def test_preset_trains_forward_and_backward(preset):
  model = _model(preset)
  model.train()
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.RandomState(1)
  images = jnp.asarray(rng.randint(0, 256, (2, 64, 64, 3)), jnp.float32)
  labels = jnp.asarray(rng.randint(0, NUM_CLASSES, (2, 64, 64)), jnp.int32)

  def loss_fn(params, rest):
    logits = nnx.merge(graph, params, rest, copy=True)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, rest)
  assert np.isfinite(float(loss))
  norms = {part: float(optax.tree.norm(getattr(grads, part)))
           for part in ('backbone', 'decoder')}
  assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms


PRESETS = (['r50_os16', 'r50_os32', 'r50_os16_bilinear', 'r50_os32_bilinear', 'r101_os8_deeplabv3plus',
            'x65_os16', 'x71_os16', 'x65_os16_deeplabv3plus', 'x65_os16_deeplabv3plus_mfb1u16c3',
            'x65_os16_efb2u1c2', 'r50_os16_deeplabv3plus_b1u2c3', 'r50_os16_deeplabv3plus_conv1_3_b3u6c3']
           + [f'r50_os16_{fusion}' for fusion in ('conv1_3', 'b1u2c3', 'b3u6c3', 'b1u2c3_b3u6c3')])


def test_every_preset_fuses_features_its_tiny_backbone_has():
  feature_names = {}
  for preset in PRESETS:
    full, tiny = voc.get_config(preset), voc.get_config(preset + ',tiny')
    assert tiny.model.fuse_features == full.model.fuse_features
    assert tiny.model.output_stride == full.model.output_stride
    key = (tiny.model.backbone, tiny.model.depth, tuple(tiny.model.stage_blocks))
    if key not in feature_names:
      backbone = nnx.eval_shape(lambda: build_backbone(tiny.model, rngs=nnx.Rngs(0)))
      feature_names[key] = set(backbone.feature_info())
    assert set(tiny.model.fuse_features) <= feature_names[key], preset


def test_bad_presets_and_feature_names_are_clear_errors():
  with pytest.raises(ValueError, match='Unknown preset'):
    voc.get_config('r34_os16')
  with pytest.raises(ValueError, match='Unknown fusion'):
    voc.get_config('r50_os16_b9u9c9')
  config = voc.get_config('r50_os16,tiny')
  config.model.fuse_features = ('b1u3c3',)
  with pytest.raises(ValueError, match='model.fuse_features'):
    nnx.eval_shape(lambda: DUNet(config.model, NUM_CLASSES, reconstruction=None, rngs=nnx.Rngs(0)))


def test_presets_pick_c_prime_from_the_flops_and_the_upper_bound():
  # configs/voc.py: 64 reproduces Table 2 (ResNet, r = 16); 128 reproduces Table 3's Xception rows
  # and keeps the r = 32 upper bound within 0.5 mIoU.
  expected = {'r50_os16': 64, 'r50_os16_conv1_3_b3u6c3': 64, 'r101_os8_deeplabv3plus': 64,
              'r50_os32': 128, 'r50_os32_bilinear': 128, 'x65_os16': 128, 'x65_os16_efb2u1c2': 128,
              'x71_os16': 128}
  assert {preset: voc.get_config(preset).model.num_components for preset in expected} == expected
