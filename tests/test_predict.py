"""predict on the six real VOC images: palette PNGs of class ids and overlays at each image's size."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dunet_jax import checkpoint, inference, predict
from dunet_jax.data import palette
from helpers import REPO_ROOT


@pytest.fixture(scope='module')
def predictor_and_workdir(tiny_run):
  workdir, model = tiny_run
  return inference.Predictor(model, checkpoint.load_config(workdir)), workdir


def test_real_images_give_palette_pngs_and_overlays(voc_labels_dir, predictor_and_workdir, tmp_path):
  predictor, _ = predictor_and_workdir
  images = predict.list_images(voc_labels_dir / 'JPEGImages')
  assert len(images) == 6
  assert predict.predict_files(predictor, images, tmp_path) == []
  for path in images:
    rgb = np.asarray(Image.open(path).convert('RGB'))
    with Image.open(tmp_path / f'{path.stem}.png') as written:
      assert written.mode == 'P' and written.size == (rgb.shape[1], rgb.shape[0])
      np.testing.assert_array_equal(np.reshape(written.getpalette()[:63], (21, 3)), palette.VOC_COLORMAP[:21])
      label_map = np.asarray(written)
    assert label_map.max() < 21
    np.testing.assert_array_equal(label_map, predictor.predict(rgb))
    overlay = np.asarray(Image.open(tmp_path / f'{path.stem}_overlay.jpg'))
    blend = np.round(0.5 * rgb + 0.5 * palette.VOC_COLORMAP[label_map]).astype(np.uint8)
    Image.fromarray(blend).save(tmp_path / 'expected.jpg', quality=90)
    assert overlay.shape == rgb.shape
    np.testing.assert_array_equal(overlay, np.asarray(Image.open(tmp_path / 'expected.jpg')))


def test_cli_names_unreadable_files_and_writes_the_rest(voc_labels_dir, predictor_and_workdir, tmp_path):
  _, workdir = predictor_and_workdir
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  Image.open(voc_labels_dir / 'JPEGImages' / '2007_000032.jpg').resize((120, 70)).save(inputs / 'small.jpg')
  (inputs / 'broken.jpg').write_bytes(b'not a jpeg')
  completed = subprocess.run(
      [sys.executable, '-m', 'dunet_jax.predict', f'--workdir={workdir}', f'--input={inputs}',
       f'--output={tmp_path / "out"}'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert completed.returncode != 0
  assert 'broken.jpg' in completed.stderr and 'Traceback' not in completed.stderr
  assert Image.open(tmp_path / 'out' / 'small.png').size == (120, 70)
  assert Image.open(tmp_path / 'out' / 'small_overlay.jpg').size == (120, 70)
  assert not (tmp_path / 'out' / 'broken.png').exists()


def test_input_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    predict.list_images(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='holds no images'):
    predict.list_images(tmp_path)
  Image.new('RGB', (4, 4)).save(tmp_path / 'a.jpg')
  Image.new('RGB', (4, 4)).save(tmp_path / 'a.png')
  with pytest.raises(ValueError, match='a.jpg and a.png'):
    predict.list_images(tmp_path)
