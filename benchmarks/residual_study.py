"""How much of the discarded momentum to apply now: a sweep of `residual_correction`.

Fine-tunes the main job's model (examples/finetune_lm.py: a byte-level
transformer pretrained on the Python language reference, fine-tuned on
standard-library docstrings) with MLorc-AdamW and MLorc-Lion at rank 4 for
several values of c, beside full AdamW and Lion at the same learning rates,
and reports the held-out loss of each as a ratio to its full-state reference.

  python benchmarks/residual_study.py            # about 15 minutes on 2 CPU cores
  python benchmarks/residual_study.py --quick    # a smoke run (writes nothing)
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import finetune_lm as lm  # noqa: E402

import common  # noqa: E402
import mlorc_optax as mlorc  # noqa: E402

ADAMW_C = (0.0, 0.3, 1.0, 2.0)
LION_C = (0.0, 0.03, 0.1, 0.3, 1.0)
LION_VARIANTS = {
    'power_iters=1': dict(power_iters=1),
    'warm_start': dict(warm_start=True),
    'b1=0.8': dict(b1=0.8),
    'b1=0.6': dict(b1=0.6),
}


def configurations(steps: int):
  schedule = lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps)
  runs = {'AdamW': lambda seed: optax.adamw(schedule(1e-3), weight_decay=0.01)}
  for c in ADAMW_C:
    runs[f'MLorc-AdamW r4 c={c:g}'] = lambda seed, c=c: mlorc.adamw(
        schedule(1e-3), weight_decay=0.01, rank=4, residual_correction=c, seed=seed)
  runs['Lion'] = lambda seed: optax.lion(schedule(1e-4), weight_decay=0.1)
  for c in LION_C:
    runs[f'MLorc-Lion r4 c={c:g}'] = lambda seed, c=c: mlorc.lion(
        schedule(1e-4), weight_decay=0.1, rank=4, residual_correction=c, seed=seed)
  # Lion's gap does not close with c: the sketch and the interpolation instead.
  for label, options in LION_VARIANTS.items():
    runs[f'MLorc-Lion r4 {label}'] = lambda seed, o=options: mlorc.lion(
        schedule(1e-4), weight_decay=0.1, rank=4, seed=seed, **o)
  return runs


def fine_tune(graphdef, pretrained, tx, data, steps, desc):
  """A copy of the pretrained model trained with `tx` (the example's loop)."""
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, pretrained))
  with tqdm(total=steps, desc=desc, leave=False, disable=None) as progress:
    lm.train(model, tx, data, steps, progress)
  return model


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--only', default='', help='comma-separated: run the configurations whose '
                      'name contains one of these (and the references), merging their rows '
                      'into the results file')
  args = parser.parse_args(argv)
  if args.quick:
    d, layers, heads, seq, batch, pre_steps, steps = 64, 1, 2, 32, 8, 10, 6
  else:
    d, layers, heads, seq, batch, pre_steps, steps = 128, 2, 4, 128, 32, 600, 300

  pre_text, ft_text = lm.corpora()
  pre, docs = lm.encode(pre_text), lm.encode(ft_text)
  cut = int(0.9 * len(docs))
  train, test = docs[:cut], lm.windows(docs[cut:], seq)
  model = lm.CharTransformer(d, layers, heads, seq, nnx.Rngs(0))
  model = fine_tune(nnx.graphdef(model), nnx.state(model), optax.adamw(3e-3),
                    lm.batches(pre, batch, seq, 0), pre_steps, 'pretraining')
  graphdef, pretrained = nnx.graphdef(model), nnx.state(model)

  rows = []
  for name, make in configurations(steps).items():
    if not any(k in name for k in args.only.split(',')) and name not in ('AdamW', 'Lion'):
      continue
    losses = []
    for seed in range(args.seeds):
      tuned = fine_tune(graphdef, pretrained, make(seed), lm.batches(train, batch, seq, 1 + seed),
                        steps, f'{name} seed {seed}')
      losses.append(float(lm.evaluate(tuned, test)))
    rows.append(dict(method=name, held_out=losses, mean=float(np.mean(losses))))
    print(f'{name:26s} held-out {np.mean(losses):.4f}', flush=True)

  ref = {r['method']: r['mean'] for r in rows}
  table = []
  for r in rows:
    base = ref['Lion'] if 'Lion' in r['method'] else ref['AdamW']
    table.append({'method': r['method'], 'held-out loss': r['mean'],
                  'vs full': r['mean'] / base, 'seeds': len(r['held_out'])})
  print(common.table(table))
  if not args.quick:  # a smoke run does not overwrite the published results
    path = os.path.join(common.RESULTS, f'residual_study_{jax.devices()[0].platform}.json')
    if args.only and os.path.exists(path):  # keep the rows of earlier runs
      fresh = {r['method'] for r in table}
      table = [r for r in json.load(open(path))['rows'] if r['method'] not in fresh] + table
    print('wrote', common.save(
        'residual_study', table,
        config=dict(d=d, layers=layers, seq=seq, batch=batch, pretrain_steps=pre_steps,
                    finetune_steps=steps, adamw_lr=1e-3, lion_lr=1e-4),
    ))


if __name__ == '__main__':
  main()
