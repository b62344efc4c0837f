"""Many devices through JAX's own sharding: 8 simulated CPU devices, FSDP and TP."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), 'multidevice_run.py')


def _report(mode):
  out = subprocess.run(
      [sys.executable, SCRIPT, mode], capture_output=True, text=True, timeout=600, check=True
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize('mode', ['explicit', 'auto'])
def test_sharded_update_matches_one_device_and_keeps_factors_sharded(mode):
  report = _report(mode)
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


def test_nnx_optimizer_with_partitioned_kernels_on_a_mesh():
  """nnx.Optimizer copies a kernel's sharding onto its state; each factor gets a fitting one."""
  report = _report('nnx')
  assert report['moved'] > 1e-3  # it trained
  for name, err in report['rel_error'].items():
    assert err < 1e-4, name
  assert report['up_u'] == ['x', None]  # kernel ('x', None): U takes the row axis
  assert report['up_s'] == [None]
  assert report['down_v'] == ['x', None]  # kernel (None, 'x'): V takes the column axis
