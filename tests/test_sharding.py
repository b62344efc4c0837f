"""Many devices through JAX's own sharding: 8 simulated CPU devices, FSDP and TP."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), 'multidevice_run.py')


@pytest.mark.parametrize('mode', ['explicit', 'auto'])
def test_sharded_update_matches_one_device_and_keeps_factors_sharded(mode):
  out = subprocess.run(
      [sys.executable, SCRIPT, mode], capture_output=True, text=True, timeout=600, check=True
  ).stdout
  report = json.loads(out.strip().splitlines()[-1])
  assert report['devices'] == 8
  for name, err in report['rel_error'].items():
    assert err < 1e-4, name
  # U follows the parameter's row sharding (FSDP), V its column sharding (TP).
  assert report['fsdp_u'] == ['x', None]
  assert report['tp_v'] == ['x', None]
  assert report['fsdp_v'] == [None, None] and report['tp_u'] == [None, None]
  assert report['update_specs']['fsdp'] == ['x', None]
  assert report['update_specs']['tp'] == [None, 'x']
  assert report['full_gathers'] == []  # no full-size (m, n) operand is all-gathered
