"""Data- and FSDP-parallel training with MLorc on many devices, through JAX's own SPMD.

A Flax NNX MLP whose kernels are annotated with `nnx.with_partitioning`
trains on a mesh; the batch is sharded along the same axis (FSDP). The MLorc
factors follow the kernels: U is sharded like a kernel's rows, V like its
columns, and the compiled update gathers no full matrix.

On a machine with one CPU the script simulates 8 devices. On several hosts
(TPU pods, GPU clusters) call `jax.distributed.initialize()` first, on every
host, then build the same mesh over `jax.devices()`: the code below is
unchanged, and each host feeds its own slice of the batch
(`jax.make_array_from_process_local_data`).

  python examples/sharded_training.py [--steps 200]
"""

import argparse
import os

if 'XLA_FLAGS' not in os.environ:  # must be set before jax is imported
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import mlorc_optax as mlorc  # noqa: E402


class MLP(nnx.Module):

  def __init__(self, d, hidden, rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(d, hidden, kernel_init=nnx.with_partitioning(init, ('fsdp', None)), rngs=rngs)
    self.down = nnx.Linear(hidden, d, kernel_init=nnx.with_partitioning(init, ('fsdp', None)), rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=200)
  args = parser.parse_args(argv)
  # On several hosts: jax.distributed.initialize() here.
  mesh = jax.make_mesh((jax.device_count(),), ('fsdp',), axis_types=(AxisType.Auto,))
  print(f'{jax.device_count()} devices, mesh {dict(mesh.shape)}')
  teacher = jax.random.normal(jax.random.key(0), (256, 256)) / 16

  with jax.set_mesh(mesh):

    @nnx.jit
    def create():
      model = MLP(256, 1024, nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, mlorc.adamw(1e-3, rank=4), wrt=nnx.Param)
      state = nnx.state(optimizer)
      nnx.update(optimizer, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
      return model, optimizer

    @nnx.jit
    def step(model, optimizer, x):
      loss_fn = lambda m: jnp.mean((m(x) - jnp.tanh(x @ teacher)) ** 2)
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    model, optimizer = create()
    mlorc.summarize(optimizer.tx, nnx.state(model, nnx.Param))  # what is compressed
    batch_sharding = NamedSharding(mesh, P('fsdp', None))
    for t in range(args.steps):
      x = jax.device_put(jax.random.normal(jax.random.key(t + 1), (256, 256)), batch_sharding)
      loss = step(model, optimizer, x)
      if t % max(args.steps // 5, 1) == 0 or t == args.steps - 1:
        print(f'step {t:4d}  loss {float(loss):.5f}')

    factors = nnx.state(optimizer.opt_state)[0]['inner_state']['mu']['up']['kernel']
    for name in ('u', 's', 'v'):
      x = factors[name][...]
      print(f'up.kernel factor {name}: shape {x.shape}, sharding {x.sharding.spec}')
  return float(loss)


if __name__ == '__main__':
  main()
