"""Transient (temp) bytes XLA allocates for the compiled update.

From jax.jit(tx.update, donate_argnums=1).lower(...).compile().memory_analysis(),
as in a train step where the optimizer state is donated. Reported against the
bytes of the largest compressed matrix: MLorc must stay flat as the model gets
deeper, bounded by one layer rather than by the model.

  python benchmarks/update_memory.py            # 4, 8, 16, 32 layers
  python benchmarks/update_memory.py --quick    # 2 and 4 layers
"""

import argparse
import sys
import time

import optax

import mlorc_optax as mlorc
import common

MIB = 2**20


def variants():
  return {
      'optax.adamw': optax.adamw(1e-3),
      'mlorc.adamw': mlorc.adamw(1e-3, rank=4),
      'mlorc.adamw +res': mlorc.adamw(1e-3, rank=4, residual_correction=1.0),
      'mlorc.lion': mlorc.lion(1e-4, rank=4),
      'galore': optax.contrib.galore(1e-3, rank=4),
  }


def depth_rows(layer_counts, d=512, vocab=4096):
  rows = []
  for layers in layer_counts:
    shapes = common.transformer_shapes(layers, d, vocab)
    params = common.as_structs(shapes)
    largest = max(vocab * d, d * 4 * d) * 4
    row = dict(layers=layers, params_MiB=common.tree_bytes(params) / MIB)
    for name, tx in variants().items():
      start = time.perf_counter()
      row[f'{name} temp_MiB'] = common.update_temp_bytes(tx, params) / MIB
      row[f'{name} x_largest'] = row[f'{name} temp_MiB'] * MIB / largest
      row[f'{name} compile_s'] = time.perf_counter() - start
    rows.append(row)
  return rows


def size_rows(sizes):
  rows = []
  for d in sizes:
    params = common.as_structs({'w': (d, 4 * d)})
    row = dict(matrix=f'{d}x{4 * d}', MiB=d * 4 * d * 4 / MIB)
    for name, tx in variants().items():
      row[f'{name} x_matrix'] = common.update_temp_bytes(tx, params) / (d * 4 * d * 4)
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  depth = depth_rows([2, 4] if args.quick else [4, 8, 16, 32])
  names = list(variants())
  print('Update temp bytes, transformer d=512, vocab 4096 (largest matrix 8 MiB), on', common.device_name())
  print(common.table(depth, ['layers', 'params_MiB'] + [f'{n} temp_MiB' for n in names] + [f'{n} x_largest' for n in names]))
  sizes = size_rows([128, 256] if args.quick else [128, 256, 512, 1024])
  print('\nUpdate temp bytes / matrix bytes, one (d, 4d) matrix')
  print(common.table(sizes))
  if not args.quick:
    print('wrote', common.save('update_memory', depth, sizes=sizes))


if __name__ == '__main__':
  sys.exit(main())
