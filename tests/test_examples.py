"""The examples run and show what they claim (quick settings)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np

EXAMPLES = os.path.join(os.path.dirname(__file__), '..', 'examples')
RESULTS = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'results')
sys.path.insert(0, EXAMPLES)


def _run(script, *args):
  return subprocess.run(
      [sys.executable, os.path.join(EXAMPLES, script), *args],
      capture_output=True, text=True, timeout=600, check=True,
  ).stdout


def _published_finetune_results():
  """Names and modification times of the example's published results."""
  names = (f for f in os.listdir(RESULTS) if f.startswith('finetune_'))
  return {f: os.stat(os.path.join(RESULTS, f)).st_mtime_ns for f in names}


def test_finetune_corpus_depends_on_nothing_imported():
  # This process has imported pytest, hypothesis, jax and much of the
  # standard library; a fresh interpreter has not. The texts must agree.
  import finetune_lm

  digest = lambda texts: hashlib.sha256('\0'.join(texts).encode()).hexdigest()
  fresh = subprocess.run(
      [sys.executable, '-c', 'import sys, hashlib; sys.path.insert(0, sys.argv[1]); import finetune_lm; '
       "print(hashlib.sha256('\\0'.join(finetune_lm.corpora()).encode()).hexdigest())", EXAMPLES],
      capture_output=True, text=True, timeout=120, check=True,
  ).stdout.strip()
  assert fresh == digest(finetune_lm.corpora())
  pretrain, finetune = finetune_lm.corpora()
  assert len(pretrain) > 100_000 and len(finetune) > 100_000


def test_finetune_example_quick(tmp_path):
  # Compiling each optimizer is most of a quick run's time: all are listed,
  # those that exercise this example's own code are run.
  import finetune_lm

  assert list(finetune_lm.optimizers(10)) == [
      'AdamW (full)', 'MLorc-AdamW r4', 'MLorc-AdamW r4 + residual correction', 'Lion (full)',
      'MLorc-Lion r4', 'MLorc-Lion r4 + warm start', 'GaLore r4', 'LoRA r4',
  ]
  only = ('AdamW (full)', 'MLorc-AdamW r4', 'MLorc-AdamW r4 + residual correction',
          'MLorc-Lion r4 + warm start', 'LoRA r4')
  published = _published_finetune_results()
  result = finetune_lm.main(['--quick', '--only', ','.join(only), '--out', str(tmp_path)])
  rows = {r['optimizer']: r for r in result['rows']}
  assert tuple(rows) == only
  for r in rows.values():
    assert np.isfinite(r['held_out_loss']) and np.isfinite(r['final_train_loss'])
    assert r['held_out_ratio'] == r['held_out_loss'] / rows['AdamW (full)']['held_out_loss']
  # Fine-tuning helps, and MLorc keeps a fraction of the full-state optimizer's state.
  for name in ('AdamW (full)', 'MLorc-AdamW r4', 'MLorc-AdamW r4 + residual correction'):
    assert rows[name]['held_out_loss'] < result['held_out_before']
  assert rows['MLorc-AdamW r4']['state_MiB'] < 0.25 * rows['AdamW (full)']['state_MiB']
  # Lion keeps one moment where AdamW keeps two.
  assert rows['MLorc-Lion r4 + warm start']['state_MiB'] < 0.125 * rows['AdamW (full)']['state_MiB']
  # The correction changes the run, not the state it keeps.
  plain, corrected = rows['MLorc-AdamW r4'], rows['MLorc-AdamW r4 + residual correction']
  assert corrected['state_MiB'] == plain['state_MiB']
  assert corrected['final_train_loss'] != plain['final_train_loss']
  # Everything goes to --out; the published results stay as they are.
  with open(tmp_path / 'finetune_lm_quick.json') as f:
    assert json.load(f)['rows'] == result['rows']
  assert (tmp_path / 'finetune_lm_quick.png').stat().st_size > 10_000
  assert _published_finetune_results() == published


def test_finetune_family_quick(tmp_path):
  # Compiling each optimizer is most of a quick run's time: the whole family
  # is listed, one pair is run.
  import finetune_lm

  names = list(finetune_lm.family_optimizers(10))
  for name in ('ADOPT', 'CAME', 'Prodigy', 'D-Adapt Lion'):
    assert {f'MLorc-{name} r4', f'{name} (full)'} <= set(names)
  only = 'ADOPT (full),MLorc-ADOPT r4'
  result = finetune_lm.main(['--quick', '--family', '--only', only, '--out', str(tmp_path)])
  rows = {r['optimizer']: r for r in result['rows']}
  assert list(rows) == only.split(',')
  for r in rows.values():
    assert np.isfinite(r['held_out_loss'])
  # MLorc keeps a fraction of the full-state version's state, and is compared with it.
  mlorc_row, full_row = rows['MLorc-ADOPT r4'], rows['ADOPT (full)']
  assert mlorc_row['state_MiB'] < 0.5 * full_row['state_MiB']
  assert mlorc_row['held_out_ratio'] == mlorc_row['held_out_loss'] / full_row['held_out_loss']
  # A variant is compared with the same full-state version; MoFaSGD has none.
  assert finetune_lm.reference_of('MLorc-ADOPT r4 + residual correction', family=True) == 'ADOPT (full)'
  assert finetune_lm.reference_of('MoFaSGD r4', family=True) not in names
  assert (tmp_path / 'finetune_family_quick.png').stat().st_size > 10_000


def test_linen_orbax_resume_example_is_bitwise():
  out = _run('linen_orbax_resume.py', '--steps', '8')
  assert 'bitwise identical to the uninterrupted one: True' in out


def test_sharded_training_example_trains_with_sharded_factors():
  out = _run('sharded_training.py', '--steps', '30')
  losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith('step')]
  assert losses[-1] < 0.8 * losses[0]
  assert "factor u: shape (256, 4), sharding P('fsdp',)" in out
  assert '8 devices' in out
