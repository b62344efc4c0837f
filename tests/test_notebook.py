"""The quickstart notebook runs from top to bottom as a Colab user runs it: from a
working directory that holds a clone named mlorc_optax, or no clone at all."""

import os
import re

import nbformat
from nbclient import NotebookClient

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')


def _execute(nb, cwd) -> str:
  """Runs `nb` in a fresh kernel whose working directory is `cwd`; returns its text output."""
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(cwd)}}).execute()
  return ''.join(
      o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
  )


def test_quickstart_runs_next_to_a_clone(tmp_path):
  # After `!git clone .../mlorc_optax` in Colab the clone's folder, which has no
  # __init__.py, is importable as an empty namespace package.
  os.symlink(REPO, tmp_path / 'mlorc_optax')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  text = _execute(nb, tmp_path)

  package = os.path.join(str(tmp_path), 'mlorc_optax', 'mlorc_optax')
  assert f'from {package}\n' in text  # the clone's library, not the namespace package
  # MLorc's state is a fraction of AdamW's, and the SVD error is near optimal.
  kib = {line.split()[0]: float(line.split()[-2]) for line in text.splitlines() if 'optimizer state' in line}
  assert kib['mlorc.adamw'] < 0.2 * kib['optax.adamw']
  err_line = next(l for l in text.splitlines() if l.startswith('spectral error'))
  err, optimal = float(err_line.split()[2].rstrip(',')), float(err_line.split()[-1])
  assert err < 1.05 * optimal
  # The report: the MLP's kernels compressed, its biases full, and the NNX
  # transformer's state a few percent of Adam's.
  assert re.search(r'^w1 +\(256, 512\) +0\|1 +256x512 +4 ', text, re.M)
  assert re.search(r'^b1 +\(512,\) +full ', text, re.M)
  assert re.search(r'^blocks/0/attn/query/kernel +\(512, 8, 64\) +0\|1,2 +512x512 ', text, re.M)
  percent = float(re.search(r'state of the transformer: ([\d.]+)%', text).group(1))
  assert percent < 8


def test_install_cell_without_a_clone(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert 'colab.research.google.com/github/' in nb.cells[0].source  # the Open in Colab badge
  nb.cells = nb.cells[:3]  # the introduction, the install cell, the imports
  text = _execute(nb, tmp_path)
  assert re.search(r'^mlorc_optax \S+ from \S+mlorc_optax$', text, re.M)
