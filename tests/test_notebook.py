"""The quickstart notebook runs from top to bottom."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'quickstart.ipynb')


def test_quickstart_notebook_executes():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  text = ''.join(
      o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
  )
  # MLorc's state is a fraction of AdamW's, and the SVD error is near optimal.
  kib = {line.split()[0]: float(line.split()[-2]) for line in text.splitlines() if 'optimizer state' in line}
  assert kib['mlorc.adamw'] < 0.2 * kib['optax.adamw']
  err_line = next(l for l in text.splitlines() if l.startswith('spectral error'))
  err, optimal = float(err_line.split()[2].rstrip(',')), float(err_line.split()[-1])
  assert err < 1.05 * optimal
