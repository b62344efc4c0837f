"""Compile time of the update against depth, and the first NNX training step.

1. For an unrolled d=256 transformer (q, k, v, o, up, down and two norms per
   layer, each layer stored separately as in a Flax NNX list of blocks), the
   time to lower and compile ``jax.jit(tx.update)`` for MLorc-AdamW and
   optax.adamw at 4, 8, 16 and 32 layers, with the size of the optimized
   HLO. Targets (issue 7): MLorc at 32 layers <= 2x its time at 4 layers and
   <= 15x optax.adamw's at 32 layers.
2. The first training step (compile included) of an NNX transformer with
   nnx.Optimizer, MLorc-AdamW against optax.adamw (target <= 2x).

Ratios are what counts: both optimizers are measured side by side in one run.

  python benchmarks/compile_time.py            # 4, 8, 16, 32 layers
  python benchmarks/compile_time.py --quick    # 2 and 4 layers
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import common
import mlorc_optax as mlorc


def unrolled_shapes(layers: int, d: int = 256) -> dict:
  block = {
      'q': (d, d), 'k': (d, d), 'v': (d, d), 'o': (d, d),
      'up': (d, 4 * d), 'down': (4 * d, d), 'norm1': (d,), 'norm2': (d,),
  }
  return {f'layer{i}': dict(block) for i in range(layers)}


def compile_seconds(tx, params) -> tuple[float, int]:
  """Seconds to lower and compile the update, and the optimized HLO's size in characters."""
  state = jax.eval_shape(tx.init, params)
  start = time.perf_counter()
  compiled = jax.jit(tx.update).lower(params, state, params).compile()
  return time.perf_counter() - start, len(compiled.as_text())


def depth_rows(layer_counts):
  rows = []
  for layers in layer_counts:
    params = common.as_structs(unrolled_shapes(layers))
    row = dict(layers=layers)
    for name, tx in (('optax.adamw', optax.adamw(1e-3)), ('mlorc.adamw', mlorc.adamw(1e-3, rank=4))):
      seconds, hlo = compile_seconds(tx, params)
      row[f'{name} compile_s'] = seconds
      row[f'{name} hlo_chars'] = hlo
    row['mlorc/optax'] = row['mlorc.adamw compile_s'] / row['optax.adamw compile_s']
    rows.append(row)
    print(common.table([row]), flush=True)
  first = rows[0]['mlorc.adamw compile_s']
  for row in rows:
    row['mlorc vs first depth'] = row['mlorc.adamw compile_s'] / first
  return rows


def nnx_first_step_rows(layers: int, d: int = 256):
  from flax import nnx

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False, rngs=rngs)
      self.norm1, self.norm2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
      self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(256, d, rngs=rngs)
      self.blocks = nnx.List([Block(rngs) for _ in range(layers)])

    def __call__(self, tokens):
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x)
      return self.embed.attend(x)

  tokens = jnp.zeros((2, 32), jnp.int32)

  def first_step(make_tx):
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
      loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tokens), tokens).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    start = time.perf_counter()
    jax.block_until_ready(step(model, optimizer, tokens))
    return time.perf_counter() - start

  row = dict(layers=layers)
  row['optax.adamw first_step_s'] = first_step(lambda: optax.adamw(1e-3))
  row['mlorc.adamw first_step_s'] = first_step(lambda: mlorc.adamw(1e-3, rank=4))
  row['mlorc/optax'] = row['mlorc.adamw first_step_s'] / row['optax.adamw first_step_s']
  return [row]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  layer_counts = [2, 4] if args.quick else [4, 8, 16, 32]
  depth = depth_rows(layer_counts)
  print('\nUpdate compile time (unrolled d=256 transformer):')
  print(common.table(depth))
  nnx_rows = nnx_first_step_rows(layer_counts[-1] if args.quick else 8)
  print('\nFirst NNX training step, compile included:')
  print(common.table(nnx_rows))
  if not args.quick:
    print('results:', common.save('compile_time', depth, nnx_first_step=nnx_rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
