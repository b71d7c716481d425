"""notebooks/quickstart.ipynb runs top to bottom (nbclient, kernel python3) on a checkpoint made here."""
import os

import nbformat
from nbclient import NotebookClient

from helpers import REPO_ROOT


def test_quickstart_notebook_executes(tiny_run):
  workdir, _ = tiny_run
  from dunet_jax import checkpoint
  from dunet_jax.data import datasets
  datasets.prepare(checkpoint.load_config(workdir).data)  # the val images the notebook shows
  notebook = nbformat.read(REPO_ROOT / 'notebooks' / 'quickstart.ipynb', as_version=4)
  assert not any(cell.get('outputs') for cell in notebook.cells if cell.cell_type == 'code'), \
      'commit the notebook without outputs'
  os.environ['DUNET_QUICKSTART_WORKDIR'] = str(workdir)
  try:
    NotebookClient(notebook, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': str(REPO_ROOT / 'notebooks')}}).execute()
  finally:
    del os.environ['DUNET_QUICKSTART_WORKDIR']
  outputs = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]
  text = ''.join(output.get('text', '') for output in outputs)
  assert 'devices: [' in text and 'classes: [' in text
  assert text.count('pixel accuracy') == 3 and 'probabilities (' in text
  assert sum('image/png' in output.get('data', {}) for output in outputs) == 2
