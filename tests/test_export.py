"""The exported StableHLO function, reloaded without the model code, against the model itself."""
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dunet_jax import cli, export
from helpers import REPO_ROOT


def model_logits(model, images):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda x: nnx.merge(graphdef, state)(x))(images))


def test_fixed_size_export_matches_the_model(tiny_run, tmp_path):
  _, model = tiny_run
  images = np.random.default_rng(0).integers(0, 256, (1, 70, 90, 3), dtype=np.uint8)
  export.save_exported(export.export_model(model, height=70, width=90, platforms=['cpu']),
                       tmp_path / 'fixed.jaxexport')
  exported = export.load_exported(tmp_path / 'fixed.jaxexport')
  np.testing.assert_allclose(exported(images), model_logits(model, images), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='shape'):
    exported(images[:, :60])


def test_symbolic_export_from_the_cli_runs_in_a_process_without_the_model_code(tiny_run, tmp_path):
  workdir, model = tiny_run
  path = tmp_path / 'any_size.jaxexport'
  completed = subprocess.run([sys.executable, '-m', 'dunet_jax.export', f'--workdir={workdir}',
                              f'--output={path}', '--symbolic'], cwd=REPO_ROOT, check=True, capture_output=True,
                             text=True)
  assert 'read_only' not in completed.stderr  # orbax's read-only manager warnings are not for users
  assert 'overriding jax.Array' not in completed.stderr  # nor its note on checkpoint.py's CPU array writer
  rng = np.random.default_rng(1)
  images = {'a': rng.integers(0, 256, (2, 45, 77, 3), dtype=np.uint8),
            'b': rng.integers(0, 256, (1, 96, 40, 3), dtype=np.uint8)}
  np.savez(tmp_path / 'images.npz', **images)
  script = ('import sys, jax, numpy as np\n'
            'exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))\n'
            'assert exported.platforms == ("cpu", "cuda", "tpu"), exported.platforms\n'
            'images = np.load(sys.argv[2])\n'
            'np.savez(sys.argv[3], **{k: np.asarray(exported.call(images[k])) for k in images.files})\n'
            'assert not any(m.startswith(("dunet_jax", "flax")) for m in sys.modules), "model code loaded"\n')
  subprocess.run([sys.executable, '-c', script, str(path), str(tmp_path / 'images.npz'),
                  str(tmp_path / 'logits.npz')], cwd=tmp_path, check=True)
  logits = np.load(tmp_path / 'logits.npz')
  for key, batch in images.items():
    np.testing.assert_allclose(logits[key], model_logits(model, batch), rtol=1e-4, atol=1e-4)


def test_cli_requires_a_size_choice_and_a_readable_file(tiny_run, tmp_path):
  workdir, _ = tiny_run
  completed = subprocess.run([sys.executable, '-m', 'dunet_jax.export', f'--workdir={workdir}',
                              f'--output={tmp_path / "x"}', '--height=64'], cwd=REPO_ROOT,
                             capture_output=True, text=True)
  assert completed.returncode != 0 and '--symbolic' in completed.stderr
  (tmp_path / 'junk.jaxexport').write_bytes(b'junk')
  with pytest.raises(ValueError, match='junk.jaxexport'):
    export.load_exported(tmp_path / 'junk.jaxexport')


def test_cli_exports_for_cpu_cuda_and_tpu_by_default_and_platforms_narrows_it(tiny_run, tmp_path, capsys):
  workdir, _ = tiny_run
  cli.run(export.main, export.define_flags, argv=[
      'export', f'--workdir={workdir}', f'--output={tmp_path / "cuda.jaxexport"}', '--height=64', '--width=64',
      '--platforms=cuda'])
  assert capsys.readouterr().out.rstrip().endswith('for cuda')
  exported = jax.export.deserialize(bytearray((tmp_path / 'cuda.jaxexport').read_bytes()))
  assert exported.platforms == ('cuda',)  # lowered on this CPU-only machine
