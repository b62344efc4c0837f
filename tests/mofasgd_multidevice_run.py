"""Runs MoFaSGD on 8 simulated CPU devices; prints a JSON report.

Used by test_mofasgd.py in a subprocess, because the device count must be set
before jax is imported: python tests/mofasgd_multidevice_run.py explicit|auto
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import mlorc_optax as mlorc  # noqa: E402

SHAPES = {'fsdp': (256, 128), 'tp': (128, 256), 'bias': (128,)}
SPECS = {'fsdp': P('x', None), 'tp': P(None, 'x'), 'bias': P()}


def two_steps(tx, params, grads):
  update = jax.jit(tx.update)
  state = jax.jit(tx.init)(params)
  _, state = update(grads, state, params)
  return update(grads, state, params), update


def main(mode):
  keys = dict(zip(SHAPES, jax.random.split(jax.random.key(0), len(SHAPES))))
  params = {k: jax.random.normal(keys[k], s) for k, s in SHAPES.items()}
  grads = jax.tree.map(lambda p: jnp.sin(3 * p) + 0.1, params)
  tx = mlorc.mofasgd(1e-2, rank=4, eta2=0.5, compress={'fsdp': True, 'tp': True, 'bias': False})
  (want, _), _ = two_steps(tx, params, grads)

  axis_type = AxisType.Explicit if mode == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh((8,), ('x',), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    put = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}
    params, grads = put(params), put(grads)
    (got, state), update = two_steps(tx, params, grads)
    hlo = update.lower(grads, state, params).compile().as_text()
  mu = state[0].mu
  spec = lambda x: [a for a in x.sharding.spec] + [None] * (x.ndim - len(x.sharding.spec))
  full_gathers = [
      line.strip() for line in hlo.splitlines()
      if 'all-gather' in line and any(f'[{m},{n}]' in line for m, n in (SHAPES['fsdp'], SHAPES['tp']))
  ]
  print(json.dumps(dict(
      devices=len(jax.devices()),
      rel_error={
          k: float(jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))) for k in SHAPES
      },
      fsdp_u=spec(mu['fsdp'].u), fsdp_v=spec(mu['fsdp'].v),
      tp_u=spec(mu['tp'].u), tp_v=spec(mu['tp'].v),
      update_specs={k: spec(got[k]) for k in ('fsdp', 'tp')},
      full_gathers=full_gathers,
  )))


if __name__ == '__main__':
  main(sys.argv[1])
