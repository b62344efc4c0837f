"""Optimizer-state bytes: Llama-2-7B shapes, Flax transformers, the example models.

Part 1 compares mlorc.adamw / mlorc.lion (rank 4) with optax.adamw,
optax.lion, optax.adafactor and GaLore on Llama-2-7B-shaped parameters, and
checks MLorc-AdamW against the theory: 2r(m + n + 1) float32 numbers per
compressed matrix plus full moments for the rest.

Part 2 reports MLorc-AdamW (rank 4, default policy: no `compress` argument)
against optax.adamw on Flax models: NNX transformers built from
nnx.MultiHeadAttention / nnx.Linear / nnx.Embed (d=512, 8 heads, unrolled and
stacked with nnx.vmap), and the models of examples/. Every number is the size
of a real state, built with jax.eval_shape (nothing is allocated).

  python benchmarks/state_memory.py
"""

import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

import mlorc_optax as mlorc
import common

GIB = 2**30
RANK = 4


def theoretical_mlorc_adamw_bytes(params, rank) -> int:
  """2r(m + n + 1) float32 numbers per compressed matrix, two full moments elsewhere."""
  views = jax.tree.structure(params).flatten_up_to(mlorc.resolve_views(params, None, rank))
  total = 0
  for p, view in zip(jax.tree.leaves(params), views):
    if view is None:
      total += 2 * int(np.prod(p.shape)) * p.dtype.itemsize
    else:
      batch, m, n = mlorc._src.matrix_view.matrix_shape(p.shape, view)
      total += int(np.prod(batch, dtype=np.int64)) * 2 * min(rank, m, n) * (m + n + 1) * 4
  return total


def llama_rows():
  params = common.as_structs(common.llama2_7b_shapes())
  state_bytes = lambda tx: common.tree_bytes(jax.eval_shape(tx.init, params))
  variants = {
      'optax.adamw': optax.adamw(1e-4),
      'mlorc.adamw (r=4)': mlorc.adamw(1e-4, rank=RANK),
      'optax.lion': optax.lion(1e-5),
      'mlorc.lion (r=4)': mlorc.lion(1e-5, rank=RANK),
      'optax.adafactor': optax.adafactor(1e-3),
      'galore (r=4)': optax.contrib.galore(1e-4, rank=RANK),
  }
  adamw = state_bytes(variants['optax.adamw'])
  rows = []
  for name, tx in variants.items():
    b = state_bytes(tx)
    rows.append(dict(optimizer=name, state_GiB=b / GIB, vs_optax_adamw=b / adamw))
  theory = theoretical_mlorc_adamw_bytes(params, RANK)
  actual = state_bytes(variants['mlorc.adamw (r=4)'])
  n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
  return rows, actual / theory, n_params


# ---------------------------------------------------------------- Flax models
class Block(nnx.Module):

  def __init__(self, d, heads, rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)


class Transformer(nnx.Module):
  """GPT-style: embedding, blocks, final norm, untied output head."""

  def __init__(self, d, heads, layers, vocab, rngs, scanned=False):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    if scanned:
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return Block(d, heads, rngs)

      self.blocks = create(rngs)
    else:
      self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)


def example_models():
  """(name, parameters as shape structs) of the models in examples/."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
  import finetune_lm
  import linen_orbax_resume
  import sharded_training  # XLA_FLAGS is not touched: the backend is already up

  nnx_params = lambda make: nnx.state(nnx.eval_shape(make), nnx.Param)
  mesh = jax.make_mesh((1,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):  # its kernels are annotated for an 'fsdp' mesh axis
    sharded_mlp = nnx_params(lambda: sharded_training.MLP(256, 1024, nnx.Rngs(0)))
  linen = linen_orbax_resume.Model()
  x = linen_orbax_resume.data(0)[0]
  return [
      ('examples/finetune_lm.py CharTransformer d=128 L=2 h=4',
       nnx_params(lambda: finetune_lm.CharTransformer(128, 2, 4, 128, nnx.Rngs(0)))),
      ('examples/finetune_lm.py --quick d=64 L=1 h=2',
       nnx_params(lambda: finetune_lm.CharTransformer(64, 1, 2, 32, nnx.Rngs(0)))),
      ('examples/linen_orbax_resume.py Linen nn.scan L=4 d=128',
       jax.eval_shape(linen.init, jax.random.key(0), x)['params']),
      ('examples/sharded_training.py MLP 256-1024-256', sharded_mlp),
  ]


def flax_rows():
  models = [
      (f'NNX transformer d=512 h=8 L=4 vocab={v}{" nnx.vmap" if s else ""}',
       nnx.state(nnx.eval_shape(lambda v=v, s=s: Transformer(512, 8, 4, v, nnx.Rngs(0), s)), nnx.Param))
      for v, s in ((256, False), (32000, False), (32000, True))
  ] + example_models()
  rows = []
  for name, params in models:
    summary = mlorc.summarize(mlorc.adamw(1e-3, rank=RANK), params, print_table=False)
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    adamw = common.tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, plain))
    kernels = [p for p in summary.parameters if p.path.endswith(('kernel', 'embedding'))]
    rows.append(dict(
        model=name,
        params=int(sum(np.prod(p.shape) for p in summary.parameters)),
        optax_adamw_MiB=adamw / 2**20,
        mlorc_adamw_MiB=summary.state_bytes / 2**20,
        vs_optax_adamw=summary.state_bytes / adamw,
        kernels_compressed=f'{sum(p.view is not None for p in kernels)}/{len(kernels)}',
    ))
  return rows


def main():
  device = common.device_name()
  llama, over_theory, n_params = llama_rows()
  print('Optimizer state, Llama-2-7B shapes (6.74e9 float32 parameters), on', device)
  print(common.table(llama))
  print(f'\nmlorc.adamw state / theoretical 2r(m+n+1) + full moments elsewhere: {over_theory:.4f}')
  flax = flax_rows()
  print('\nMLorc-AdamW (rank 4, default policy) against optax.adamw, Flax models:')
  print(common.table(flax))
  print('wrote', common.save(
      'state_memory', llama, params=n_params, mlorc_adamw_over_theory=over_theory, rank=RANK,
      flax_models=flax,
  ))


if __name__ == '__main__':
  sys.exit(main())
