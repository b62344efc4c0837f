"""The examples run and show what they claim (quick settings)."""

import os
import subprocess
import sys

import numpy as np

EXAMPLES = os.path.join(os.path.dirname(__file__), '..', 'examples')
sys.path.insert(0, EXAMPLES)


def _run(script, *args):
  return subprocess.run(
      [sys.executable, os.path.join(EXAMPLES, script), *args],
      capture_output=True, text=True, timeout=600, check=True,
  ).stdout


def test_finetune_example_quick(tmp_path):
  import finetune_lm

  result = finetune_lm.main(['--quick', '--out', str(tmp_path)])
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'AdamW (full)', 'MLorc-AdamW r4', 'Lion (full)', 'MLorc-Lion r4', 'GaLore r4', 'LoRA r4'}
  for r in rows.values():
    assert np.isfinite(r['held_out_loss'])
  # Fine-tuning helps, and MLorc keeps a fraction of AdamW's state.
  for name in ('AdamW (full)', 'MLorc-AdamW r4'):
    assert rows[name]['held_out_loss'] < result['held_out_before']
  assert rows['MLorc-AdamW r4']['state_MiB'] < 0.25 * rows['AdamW (full)']['state_MiB']
  assert rows['MLorc-Lion r4']['state_MiB'] < 0.25 * rows['Lion (full)']['state_MiB']
  assert (tmp_path / 'finetune_lm_quick.png').stat().st_size > 0


def test_finetune_family_quick(tmp_path):
  import finetune_lm

  result = finetune_lm.main(['--quick', '--family', '--out', str(tmp_path)])
  rows = {r['optimizer']: r for r in result['rows']}
  for r in rows.values():
    assert np.isfinite(r['held_out_loss'])
  # Each MLorc version keeps a fraction of its full-state version's state.
  for name in ('ADOPT', 'CAME', 'Prodigy', 'D-Adapt Lion'):
    assert rows[f'MLorc-{name} r4']['state_MiB'] < 0.5 * rows[f'{name} (full)']['state_MiB']
  assert (tmp_path / 'finetune_family_quick.png').stat().st_size > 0


def test_linen_orbax_resume_example_is_bitwise():
  out = _run('linen_orbax_resume.py', '--steps', '8')
  assert 'bitwise identical to the uninterrupted one: True' in out


def test_sharded_training_example_trains_with_sharded_factors():
  out = _run('sharded_training.py', '--steps', '30')
  losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith('step')]
  assert losses[-1] < 0.8 * losses[0]
  assert "factor u: shape (256, 4), sharding P('fsdp',)" in out
  assert '8 devices' in out
