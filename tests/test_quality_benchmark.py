"""The quality benchmark's --quick smoke mode: every task, each kind of method, results and plot.

Compiling is most of a quick run's time; the higher-rank and warm-start MLorc
rows differ from the ones run here only in their arguments.
"""

import json
import math
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), '..', 'benchmarks')
sys.path.insert(0, BENCHMARKS)

pytest.importorskip('sklearn')

SMOKE = ('AdamW', 'Lion', 'Adafactor', 'GaLore r4', 'LoRA r4', 'MLorc-AdamW r4',
         'MLorc-AdamW r4 +res', 'MLorc-Lion r4')


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  import quality

  out = tmp_path_factory.mktemp('quality')
  quality.main(['--quick', '--out', str(out), '--methods', ','.join(SMOKE)])
  with open(out / 'quality_quick.json') as f:
    return quality, out, json.load(f)


def test_every_task_and_method_has_a_finite_held_out_loss(quick):
  quality, _, result = quick
  assert set(result['tasks']) == set(quality.TASKS)
  for name, task in result['tasks'].items():
    rows = {r['method']: r for r in task['summary']}
    assert set(rows) == set(SMOKE) and set(SMOKE) <= set(quality.METHODS), name
    for method, r in rows.items():
      assert math.isfinite(r['test_mean']) and r['test_mean'] > 0, (name, method)
      assert r['state_bytes'] > 0, (name, method)
    assert rows['AdamW']['ratio'] == 1.0
    assert rows['MLorc-Lion r4']['reference'] == 'Lion'
    assert math.isfinite(task['pretrained']['test_loss'])


def test_state_bytes_are_ordered(quick):
  _, _, result = quick
  for name, task in result['tasks'].items():
    size = {r['method']: r['state_bytes'] for r in task['summary']}
    assert size['MLorc-AdamW r4'] < size['AdamW'], name
    assert size['MLorc-AdamW r4'] == size['MLorc-AdamW r4 +res'], name
    assert size['MLorc-Lion r4'] < size['Lion'] < size['AdamW'], name
    assert size['GaLore r4'] < size['AdamW'], name
    assert size['Adafactor'] < size['AdamW'], name
    assert size['LoRA r4'] < size['AdamW'], name


def test_plot_written_and_results_not_published(quick):
  _, out, _ = quick
  assert (out / 'quality_quick.png').stat().st_size > 0
  assert not os.path.exists(os.path.join(BENCHMARKS, 'results', 'quality_quick.json'))


def test_resume_skips_stored_runs(quick):
  quality, out, before = quick
  quality.main(['--quick', '--out', str(out), '--tasks', 'digits', '--methods', 'AdamW,LoRA r4',
                '--resume'])
  with open(out / 'quality_quick.json') as f:
    after = json.load(f)
  # The stored runs are kept as they were (not run again), lm included.
  assert after['tasks']['digits']['runs'] == before['tasks']['digits']['runs']
  assert after['tasks']['lm'] == before['tasks']['lm']
