"""config_checks.validate_model: what must never train, each refused with the key and the fix."""
import logging

import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import context, default, voc
from dunet_jax import convert_weights
from dunet_jax.models import config_checks, dunet, pretrained, xception


@pytest.mark.parametrize('config_file, preset, arch, source', [
    (voc, 'r50_os16', 'resnet50c', 'model.safetensors'),
    (voc, 'r101_os8_deeplabv3plus', 'resnet101c', 'model.safetensors'),
    (voc, 'x65_os16_efb2u1c2', 'xception65', 'model.safetensors'),
    (context, None, 'xception71', 'model.safetensors'),
])
def test_paper_presets_refuse_to_start_without_imagenet_weights(config_file, preset, arch, source):
  config = config_file.get_config(preset)
  with pytest.raises(ValueError) as error:
    config_checks.validate_model(config)
  message = str(error.value)
  assert 'config.model.pretrained is empty' in message
  assert (f'`python -m dunet_jax.convert_weights --source=PATH/{source} --arch={arch} '
          f'--output=weights/{arch}.npz`') in message
  assert f'--config.model.pretrained=weights/{arch}.npz' in message
  assert '--config.model.pretrained=none' in message


def test_the_command_follows_the_stem_and_the_arch_fits_the_backbone():
  config = voc.get_config('r50_os16')
  config.model.stem = 'standard'
  assert config_checks.convert_weights_arch(config.model) == 'resnet50'
  assert '--source=PATH/resnet50-<hash>.pth --arch=resnet50 ' in config_checks.convert_command(config.model)
  # The arch named for the deep-stem preset is one whose converted tensors are exactly its backbone's.
  model_config = voc.get_config('r50_os16').model
  backbone = nnx.eval_shape(lambda: dunet.build_backbone(model_config, rngs=nnx.Rngs(0)))
  assert (pretrained.parameter_shapes(backbone)
          == convert_weights.target_shapes(config_checks.convert_weights_arch(model_config)))
  assert [config_checks.convert_weights_arch(voc.get_config(preset).model)
          for preset in ('r101_os8_deeplabv3plus', 'x65_os16', 'x71_os16')] == ['resnet101c', 'xception65',
                                                                                'xception71']


def test_tiny_presets_and_the_demo_train_without_weights_and_none_is_logged(caplog):
  for config in (voc.get_config('r50_os16,tiny'), context.get_config('x65_os16,tiny'), default.get_config()):
    config_checks.validate_model(config)
  config = voc.get_config('x65_os16')
  config.model.pretrained = 'none'
  with caplog.at_level(logging.WARNING):
    config_checks.validate_model(config)
  assert "config.model.pretrained='none'" in caplog.text and 'on purpose' in caplog.text


def test_float16_is_refused_with_the_alternatives():
  config = voc.get_config('r50_os16,tiny')
  config.model.compute_dtype = 'float16'
  with pytest.raises(ValueError, match=r"config.model.compute_dtype='float16' is not supported: .*loss "
                                       r"scaling.*Use 'bfloat16'"):
    config_checks.validate_model(config)


def test_a_compute_dtype_that_is_not_a_dtype_is_refused_naming_the_key():
  config = voc.get_config('r50_os16,tiny')
  config.model.compute_dtype = 'bf16'
  with pytest.raises(ValueError, match=r"config.model.compute_dtype='bf16': use one of .*'bfloat16'"):
    config_checks.validate_model(config)


def test_a_missing_weights_file_is_named(tmp_path):
  config = voc.get_config('r50_os16')
  config.model.pretrained = str(tmp_path / 'resnet50c.npz')
  with pytest.raises(FileNotFoundError, match='config.model.pretrained=.*resnet50c.npz: no such file'):
    config_checks.validate_model(config)


def test_xception_weights_refuse_imagenet_normalisation_and_load_with_tf_convention(tmp_path):
  # A tiny Xception-65's tensors written the way convert_weights writes xception65 (arch metadata
  # and the TF input convention included); the width does not matter to the normalisation check.
  backbone = nnx.eval_shape(lambda: xception.Xception(ml_collections.ConfigDict(dict(
      depth=65, base_width=8, stage_blocks=(1,), output_stride=16, multi_grid=(1, 1, 1),
      compute_dtype='float32')), rngs=nnx.Rngs(0)))
  arrays = {key: np.full(shape, 0.5, np.float32) for key, shape in pretrained.parameter_shapes(backbone).items()}
  path = tmp_path / 'xception65.npz'
  convert_weights.write_npz(path, arrays, 'xception65', 'model.safetensors')
  assert pretrained.read_convention(path) == pretrained.TF_INCEPTION
  config = voc.get_config('x65_os16')
  config.model.pretrained = str(path)
  config_checks.validate_model(config)  # the preset's defaults are the TF convention
  assert tuple(config.data.pad_pixel) == pretrained.neutral_pad_pixel(config.model.pixel_mean) == (128,) * 3
  assert pretrained.load_pretrained(backbone, config.model) == 'xception65'
  assert float(backbone.conv1_1.conv.kernel[...].mean()) == 0.5
  config.model.pixel_mean, config.model.pixel_std = voc.get_config('r50_os16').model.pixel_mean, (0.229, 0.224, 0.225)
  expected = (r'trained on inputs normalised with mean \(0.5, 0.5, 0.5\), std \(0.5, 0.5, 0.5\) on RGB pixels '
              r'in 0..1, i.e. model.pixel_mean=\(0.5,0.5,0.5\), model.pixel_std=\(0.5,0.5,0.5\); the config '
              r'has model.pixel_mean=\(0.485,0.456,0.406\), model.pixel_std=\(0.229,0.224,0.225\)')
  with pytest.raises(pretrained.PretrainedWeightsError, match=expected):
    config_checks.validate_model(config)
  with pytest.raises(pretrained.PretrainedWeightsError, match=expected):
    pretrained.load_pretrained(backbone, config.model)


def test_bgr_0_255_conventions_convert_to_rgb_0_1_config_units():
  caffe = pretrained.InputConvention((103.94, 116.78, 123.68), (1.0, 1.0, 1.0), 'BGR', 255.0)
  mean, std = caffe.config_mean_std()
  np.testing.assert_allclose(mean, (123.68 / 255, 116.78 / 255, 103.94 / 255))
  np.testing.assert_allclose(std, (1 / 255,) * 3)
  assert pretrained.neutral_pad_pixel(mean) == (124, 117, 104)
  for arch in ('resnet50', 'resnet50c', 'resnet101c'):
    assert convert_weights.ARCHS[arch].convention.config_mean_std() == (
        tuple(default.get_config().model.pixel_mean), tuple(default.get_config().model.pixel_std))
