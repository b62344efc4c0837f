"""MLorc inside Flax NNX training loops, and the README's main job in quick mode."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mlorc_optax as mlorc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(32, 64, rngs=rngs)
    self.out = nnx.Linear(64, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_nnx_optimizer_trains_with_low_rank_state():
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mlorc.adamw(1e-2, rank=2, compress=True), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (128, 32))
  y = jnp.sin(x[:, :8])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.3 * losses[0]
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(optimizer.opt_state))
  kernel_u = [l for p, l in leaves if 'hidden' in jax.tree_util.keystr(p) and "'u'" in jax.tree_util.keystr(p)]
  assert kernel_u and kernel_u[0].shape == (32, 2)


def test_finetune_example_quick(tmp_path):
  import finetune_lm

  result = finetune_lm.main(['--quick', '--out', str(tmp_path)])
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'AdamW (full)', 'MLorc-AdamW r4', 'Lion (full)', 'MLorc-Lion r4', 'GaLore r4', 'LoRA r4'}
  for r in rows.values():
    assert np.isfinite(r['held_out_loss'])
  # Fine-tuning helps, and MLorc keeps a fraction of AdamW's state.
  for name in ('AdamW (full)', 'MLorc-AdamW r4'):
    assert rows[name]['held_out_loss'] < result['held_out_before']
  assert rows['MLorc-AdamW r4']['state_MiB'] < 0.25 * rows['AdamW (full)']['state_MiB']
  assert rows['MLorc-Lion r4']['state_MiB'] < 0.25 * rows['Lion (full)']['state_MiB']
  assert (tmp_path / 'finetune_lm_quick.png').stat().st_size > 0
