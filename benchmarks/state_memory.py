"""Optimizer-state bytes for Llama-2-7B-shaped parameters (no allocation).

Compares mlorc.adamw / mlorc.lion (rank 4) with optax.adamw, optax.lion,
optax.adafactor and GaLore, and checks MLorc-AdamW against the theory:
2r(m + n + 1) float32 numbers per compressed matrix plus full moments for the
rest.

  python benchmarks/state_memory.py
"""

import sys

import jax
import numpy as np
import optax

import mlorc_optax as mlorc
import common

GIB = 2**30


def theoretical_mlorc_adamw_bytes(params, rank, min_dim_size=128) -> int:
  total = 0
  for p in jax.tree.leaves(params):
    view = mlorc.default_view(p.shape, rank, min_dim_size)
    if view is None:
      total += 2 * int(np.prod(p.shape)) * 4
    else:
      *batch, m, n = p.shape
      total += int(np.prod(batch, dtype=np.int64)) * 2 * rank * (m + n + 1) * 4
  return total


def main():
  rank = 4
  params = common.as_structs(common.llama2_7b_shapes())
  state_bytes = lambda tx: common.tree_bytes(jax.eval_shape(tx.init, params))
  variants = {
      'optax.adamw': optax.adamw(1e-4),
      'mlorc.adamw (r=4)': mlorc.adamw(1e-4, rank=rank),
      'optax.lion': optax.lion(1e-5),
      'mlorc.lion (r=4)': mlorc.lion(1e-5, rank=rank),
      'optax.adafactor': optax.adafactor(1e-3),
      'galore (r=4)': optax.contrib.galore(1e-4, rank=rank),
  }
  adamw = state_bytes(variants['optax.adamw'])
  rows = []
  for name, tx in variants.items():
    b = state_bytes(tx)
    rows.append(dict(optimizer=name, state_GiB=b / GIB, vs_optax_adamw=b / adamw))
  theory = theoretical_mlorc_adamw_bytes(params, rank)
  actual = state_bytes(variants['mlorc.adamw (r=4)'])
  print('Optimizer state, Llama-2-7B shapes (6.74e9 float32 parameters), on', common.device_name())
  print(common.table(rows))
  print(f'\nmlorc.adamw state / theoretical 2r(m+n+1) + full moments elsewhere: {actual / theory:.4f}')
  print('wrote', common.save(
      'state_memory', rows, params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
      mlorc_adamw_over_theory=actual / theory, rank=rank,
  ))


if __name__ == '__main__':
  sys.exit(main())
