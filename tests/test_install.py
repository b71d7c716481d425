"""`pip install .` ships dunet_jax and its configs: from another directory, with nothing of the
checkout on the path, a CLI starts and builds a config from a config file."""
import os
import shutil
import subprocess
import sys

from helpers import REPO_ROOT


def test_installed_cli_and_config_work_from_another_directory(tmp_path):
  """Installs a copy of the checkout (pip builds in the source tree) without dependencies or network."""
  source = tmp_path / 'source'
  source.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(REPO_ROOT / name, source / name)
  for package in ('dunet_jax', 'configs'):
    shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns('__pycache__'))
  site = tmp_path / 'site'
  install = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index', '--no-build-isolation',
       f'--target={site}', str(source)], capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr[-3000:]
  assert (site / 'configs' / 'voc.py').is_file() and (site / 'dunet_jax' / 'reconstruction' / 'moments.py').is_file()
  assert not (site / 'tests').exists()

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
  env['PYTHONPATH'] = str(site)
  run = subprocess.run(
      [sys.executable, '-m', 'dunet_jax.main', f'--config={site / "configs" / "voc.py"}:r50_os16', '--help'],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  output = run.stdout + run.stderr
  assert f'{site}/dunet_jax/main.py' in output, output[-3000:]     # the installed copy, not the checkout
  assert '--workdir' in output and 'Error' not in output, output[-3000:]
