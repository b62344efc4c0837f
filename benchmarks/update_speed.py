"""Step time of the optimizer update: MLorc against optax, GaLore and PyTorch.

Every variant is compiled first; then rounds run each variant once, in turn, so
that the machine's noise falls on all of them alike, and the median per
variant is reported together with its ratio to optax.adamw from the same run.

  python benchmarks/update_speed.py            # full run
  python benchmarks/update_speed.py --quick    # fewer rounds and sizes
"""

import argparse
import sys

import jax
import numpy as np
import optax

import mlorc_optax as mlorc
import common
import torch_reference

GALORE_GAP = 200


def galore_time(tx, grads, params, rounds):
  """Amortised GaLore step: (gap - 1) plain steps and one with a full SVD."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  at = lambda count: optax.tree.set(state, count=jax.numpy.asarray(count, jax.numpy.int32))
  refresh, plain = at(0), at(1)
  t_plain = common.time_calls(lambda: jax.block_until_ready(update(grads, plain, params)), rounds)
  t_svd = common.time_calls(lambda: jax.block_until_ready(update(grads, refresh, params)), 3, warmup=1)
  return ((GALORE_GAP - 1) * t_plain + t_svd) / GALORE_GAP


def interleaved(variants, grads, params, rounds):
  """Median seconds per variant, timed round-robin."""
  runs = {}
  for name, tx in variants.items():
    update, state = jax.jit(tx.update), tx.init(params)
    runs[name] = lambda u=update, s=state: jax.block_until_ready(u(grads, s, params))
    runs[name]()  # compile
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      times[name].append(common.time_calls(run, 1, warmup=0))
  return {name: float(np.median(t)) for name, t in times.items()}


def headline(rounds, rank=4):
  shapes = common.transformer_shapes(layers=4, d=512, vocab=4096)
  params, grads = common.as_arrays(shapes, 0), common.as_arrays(shapes, 1)
  variants = {
      'optax.adamw': optax.adamw(1e-3),
      'mlorc.adamw': mlorc.adamw(1e-3, rank=rank),
      'mlorc.adamw warm_start, power_iters=0': mlorc.adamw(
          1e-3, rank=rank, warm_start=True, power_iters=0
      ),
      'mlorc.adamw residual_correction=1': mlorc.adamw(1e-3, rank=rank, residual_correction=1.0),
      'optax.lion': optax.lion(1e-4),
      'mlorc.lion': mlorc.lion(1e-4, rank=rank),
      'mlorc.lion warm_start': mlorc.lion(1e-4, rank=rank, warm_start=True),
  }
  times = interleaved(variants, grads, params, rounds)
  times['galore (amortised)'] = galore_time(
      optax.contrib.galore(1e-3, rank=rank, update_proj_gap=GALORE_GAP), grads, params, rounds
  )
  if torch_reference.available():
    times['torch MLorc-AdamW (reference)'] = torch_reference.time_mlorc_adamw(shapes, rank, rounds)
  base = times['optax.adamw']
  return [
      dict(optimizer=name, ms=1e3 * t, vs_optax_adamw=t / base, vs_mlorc_adamw=t / times['mlorc.adamw'])
      for name, t in times.items()
  ]


def scaling(rounds, layer_counts, sizes):
  rows = []
  for layers in layer_counts:
    shapes = common.transformer_shapes(layers=layers, d=512, vocab=4096)
    params, grads = common.as_arrays(shapes, 0), common.as_arrays(shapes, 1)
    t = interleaved({'adamw': optax.adamw(1e-3), 'mlorc': mlorc.adamw(1e-3)}, grads, params, rounds)
    rows.append(dict(axis='layers', value=layers, optax_ms=1e3 * t['adamw'],
                     mlorc_ms=1e3 * t['mlorc'], ratio=t['mlorc'] / t['adamw']))
  for d in sizes:
    shapes = {'w': (d, d)}
    params, grads = common.as_arrays(shapes, 0), common.as_arrays(shapes, 1)
    t = interleaved({'adamw': optax.adamw(1e-3), 'mlorc': mlorc.adamw(1e-3)}, grads, params, rounds)
    rows.append(dict(axis='matrix d x d', value=d, optax_ms=1e3 * t['adamw'],
                     mlorc_ms=1e3 * t['mlorc'], ratio=t['mlorc'] / t['adamw']))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  rounds = 5 if args.quick else 30
  head = headline(rounds)
  print('Update step, 4 layers, d=512, vocab 4096, rank 4 on', common.device_name())
  print(common.table(head))
  grow = scaling(rounds, [2, 4] if args.quick else [2, 4, 8, 16],
                 [256, 512] if args.quick else [256, 512, 1024, 2048, 4096])
  print('\nHow the update cost grows (mlorc.adamw / optax.adamw, rank 4)')
  print(common.table(grow))
  if not args.quick:
    print('wrote', common.save('update_speed', head, scaling=grow, rounds=rounds))


if __name__ == '__main__':
  sys.exit(main())
