"""Linen + orbax: train with MLorc-Lion, checkpoint, stop, restore, continue.

A Linen model with nn.scan layers (kernels and biases carry a leading layer
axis) trains with a `TrainState` whose `tx` is `mlorc.lion`. Halfway through,
the state is saved with orbax's CheckpointManager; a second run restores it
into an abstract target (StandardRestore keeps the NamedTuple states) and
continues. The script checks that the resumed run is bitwise identical to
an uninterrupted one.

  python examples/linen_orbax_resume.py [--steps 40] [--dir /tmp/mlorc_ckpt]
"""

import argparse
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.training import train_state

import mlorc_optax as mlorc


class Layer(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + nn.gelu(nn.Dense(x.shape[-1])(x)), None


class Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Layer, variable_axes={'params': 0}, split_rngs={'params': True}, length=4)
    x, _ = layers()(nn.Dense(128)(x), None)
    return nn.Dense(1)(x)


def data(step):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (64, 16))
  return x, jnp.sum(jnp.sin(x), axis=-1, keepdims=True)


@jax.jit
def train_step(state, x, y):
  loss_fn = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def new_state():
  model = Model()
  params = model.init(jax.random.key(1), data(0)[0])['params']
  # Scanned (4, 128, 128) kernels are compressed layer by layer; (4, 128) biases are not.
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=mlorc.lion(3e-4, rank=4))


def run(state, start, stop, manager=None, save_at=None):
  for step in range(start, stop):
    state, loss = train_step(state, *data(step))
    if manager is not None and step + 1 == save_at:
      manager.save(step + 1, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
  return state, float(loss)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--dir', default=None, help='checkpoint directory (default: a temporary one)')
  args = parser.parse_args(argv)
  directory = args.dir or tempfile.mkdtemp(prefix='mlorc_ckpt_')
  half = args.steps // 2

  state = new_state()
  mlorc.summarize(state.tx, state.params)  # what MLorc-Lion keeps for each parameter
  straight, loss = run(state, 0, args.steps)
  print(f'uninterrupted: {args.steps} steps, loss {loss:.5f}')

  with ocp.CheckpointManager(directory) as manager:
    run(new_state(), 0, half, manager, save_at=half)  # "crashes" after saving
  with ocp.CheckpointManager(directory) as manager:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, new_state())
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
  resumed, loss = run(restored, half, args.steps)
  print(f'resumed from step {half}: loss {loss:.5f}')

  same = all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                      jax.tree.leaves((resumed.params, resumed.opt_state)))
  )
  print('resumed run is bitwise identical to the uninterrupted one:', same)
  if args.dir is None:
    shutil.rmtree(directory)
  return same


if __name__ == '__main__':
  raise SystemExit(0 if main() else 1)
