"""Runs MLorc-AdamW on 8 simulated CPU devices; prints a JSON report.

Used by test_sharding.py in a subprocess, because the device count must be set
before jax is imported: python tests/multidevice_run.py explicit|auto
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
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
  tx = mlorc.adamw(1e-2, rank=4, compress={'fsdp': True, 'tp': True, 'bias': False})
  (want, _), _ = two_steps(tx, params, grads)

  axis_type = AxisType.Explicit if mode == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh((8,), ('x',), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    put = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}
    params, grads = put(params), put(grads)
    (got, state), update = two_steps(tx, params, grads)
    hlo = update.lower(grads, state, params).compile().as_text()
  mu = state[0].inner_state.mu
  spec = lambda x: [a for a in x.sharding.spec] + [None] * (x.ndim - len(x.sharding.spec))
  full_gathers = [
      line.strip() for line in hlo.splitlines()
      if 'all-gather' in line and any(f'[{m},{n}]' in line for m, n in (SHAPES['fsdp'], SHAPES['tp']))
  ]
  report = dict(
      rel_error={
          k: float(jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))) for k in ('fsdp', 'tp')
      },
      devices=len(jax.devices()),
      fsdp_u=spec(mu['fsdp'].u), fsdp_v=spec(mu['fsdp'].v),
      tp_u=spec(mu['tp'].u), tp_v=spec(mu['tp'].v),
      update_specs={k: spec(got[k]) for k in got},
      full_gathers=full_gathers,
  )
  print(json.dumps(report))


def nnx_main():
  """nnx.Optimizer over kernels annotated with nnx.with_partitioning."""
  from flax import nnx

  class MLP(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.up = nnx.Linear(64, 256, kernel_init=nnx.with_partitioning(init, ('x', None)), rngs=rngs)
      self.down = nnx.Linear(256, 64, kernel_init=nnx.with_partitioning(init, (None, 'x')), rngs=rngs)

    def __call__(self, x):
      return self.down(nnx.relu(self.up(x)))

  x = jax.random.normal(jax.random.key(1), (32, 64))
  y = jnp.sin(x)

  def train():
    @nnx.jit
    def create():
      model = MLP(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, mlorc.adamw(1e-2, rank=4, compress=True), wrt=nnx.Param)
      state = nnx.state(optimizer)
      nnx.update(optimizer, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
      return model, optimizer

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads)

    model, optimizer = create()
    initial = np.asarray(model.up.kernel[...])
    for _ in range(5):
      step(model, optimizer)
    return model, optimizer, initial

  auto = (AxisType.Auto,)
  with jax.set_mesh(jax.make_mesh((1,), ('x',), axis_types=auto, devices=jax.devices()[:1])):
    want = train()
  with jax.set_mesh(jax.make_mesh((8,), ('x',), axis_types=auto)):
    got = train()
  kernel = lambda run, name: np.asarray(nnx.state(run[0])[name]['kernel'][...])
  factors = lambda run, name: nnx.state(run[1].opt_state)[0]['inner_state']['mu'][name]['kernel']
  spec = lambda x: [a for a in x.sharding.spec] + [None] * (x.ndim - len(x.sharding.spec))
  report = dict(
      rel_error={
          name: float(np.max(np.abs(kernel(got, name) - kernel(want, name))) / np.max(np.abs(kernel(want, name))))
          for name in ('up', 'down')
      },
      up_u=spec(factors(got, 'up')['u'][...]), up_s=spec(factors(got, 'up')['s'][...]),
      down_v=spec(factors(got, 'down')['v'][...]),
      moved=float(np.max(np.abs(kernel(got, 'up') - got[2])) / np.max(np.abs(got[2]))),
  )
  print(json.dumps(report))


if __name__ == '__main__':
  nnx_main() if sys.argv[1] == 'nnx' else main(sys.argv[1])
