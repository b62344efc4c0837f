"""What steers XLA: the few places where the library shapes the compiled program.

Inventory (each measured with ``compile().memory_analysis()`` or a profile on
XLA:CPU, jax 0.10; GPU and TPU not yet measured):

- `serialize_after` (here): a data dependency from one parameter's results to
  the next parameter's inputs, so that only one matrix's full-size
  temporaries are alive at a time. XLA:CPU expands an optimization barrier
  before its concurrency-first scheduler, which then starts every
  parameter's reconstruction at once; a real data dependency is kept.
  Guarded by tests/test_memory.py (temp bytes flat in depth). Per backend
  in `SERIALIZE_ON`: measured on CPU; kept on for GPU and TPU until measured
  there (a scheduler that overlaps parameters would cost memory, not speed).
  `compress_moments._passes` also makes each update wait for its leaf's new
  factors: otherwise XLA:CPU computes the updates before the loops and keeps
  them alive (MLorc-AdamW's temp was 2.1x the largest matrix, now 1.1x).
- `randomized_svd._FUSED_RECONSTRUCT_MAX_RANK` (in `reconstruct`):
  up to this rank u diag(s) v^T is written as r outer products, which XLA
  fuses into the consumer instead of giving a matmul's (m, n) output its own
  buffer. Guarded by tests/test_memory.py.
- The transposed product (`randomized_svd._left_product`): a^T q is kept as
  the rows q^T a, because XLA:CPU transposes all of a first (ten times slower
  for a (512, 2048) matrix). Measured by benchmarks/update_speed.py.
- The negative-fill pass (`repair.negative_fill`): the repair's fill is
  computed a block of rows at a time, so the reconstruction is never stored.
  Guarded by tests/test_memory.py.
- One loop per group of same-shaped matrices (`leaf_groups`): the compiled
  program holds one copy of the per-matrix step per distinct shape, not per
  matrix, so compile time does not grow with depth. Guarded by
  tests/test_compile_structure.py; measured by benchmarks/compile_time.py.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mlorc_optax._src.randomized_svd import LowRankFactors

def _probe(x: Any) -> jax.Array:
  """A cheap scalar read of a result: the singular values of factors (tiny
  and replicated, so this also holds under sharding), else the sum."""
  return jnp.sum(x.s if isinstance(x, LowRankFactors) else x).astype(jnp.float32)


# Backends on which parameters are serialized (see the inventory above).
SERIALIZE_ON = {'cpu': True, 'gpu': True, 'cuda': True, 'rocm': True, 'tpu': True}


def serialize_after(done: Sequence[Any], tree: Any) -> Any:
  """`tree`, unchanged in value, computed only once everything in `done` is.

  Adds to every float array of `tree` a zero read from the results `done`
  (factors or arrays). A non-finite read counts as zero, so nothing leaks
  from one parameter into the next.
  """
  leaves = jax.tree.leaves(done, is_leaf=lambda x: isinstance(x, LowRankFactors))
  if not leaves or not SERIALIZE_ON.get(jax.default_backend(), True):
    return tree
  probe = sum(_probe(x) for x in leaves)
  zero = jnp.where(jnp.isfinite(probe), probe, 0.0) * 0.0

  def add(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x + zero.astype(x.dtype)
    return x

  return jax.tree.map(add, tree)
