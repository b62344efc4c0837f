"""Orbax: save mid-training, restore into an abstract target, continue bit for bit."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

import mlorc_optax as mlorc
from helpers import COMPRESS_ALL, gradient, make_params


def _steps(tx, params, state, start, count):
  update = jax.jit(tx.update)
  for t in range(start, start + count):
    updates, state = update(gradient(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_resume_is_bitwise_identical(tmp_path):
  tx = mlorc.adamw(1e-2, rank=2, compress=COMPRESS_ALL)
  params = make_params(jax.random.key(0))
  params, state = _steps(tx, params, tx.init(params), 0, 4)

  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(4, args=ocp.args.StandardSave({'params': params, 'opt_state': state}))
    manager.wait_until_finished()
  straight = _steps(tx, params, state, 4, 5)

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {'params': params, 'opt_state': state})
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
  assert isinstance(restored['opt_state'][0], mlorc.CompressedMomentsState)
  assert isinstance(restored['opt_state'][0].inner_state.mu['w'], mlorc.LowRankFactors)
  resumed = _steps(tx, restored['params'], restored['opt_state'], 4, 5)

  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
