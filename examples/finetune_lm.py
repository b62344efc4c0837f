"""Fine-tune a small Flax NNX transformer with MLorc and the usual alternatives.

A character-level transformer is pretrained briefly on the Python language
reference that ships with Python (``pydoc_data.topics``), then fine-tuned on
another text that ships with it: the docstrings of some standard-library
modules, parsed from their source files (`corpora`; both texts depend only on
the Python version). The fine-tuning run is repeated from the same pretrained
weights with full AdamW; the paper's MLorc-AdamW (rank 4) and, beside it, the
best configuration we found, MLorc-AdamW with residual correction; full Lion,
MLorc-Lion and MLorc-Lion with warm-started sketches; GaLore (rank 4, from
optax.contrib) and LoRA (rank 4, a small implementation of our own). It shows
one progress bar per optimizer, prints held-out loss, optimizer-state size and
step time with what each column means, and writes the results (JSON) and a
plot (loss curves, held-out losses) into the directory `--out`.

  python examples/finetune_lm.py            # under 10 minutes on 2 CPU cores, 4 when idle
  python examples/finetune_lm.py --quick    # a smoke run, used by the tests
  python examples/finetune_lm.py --family   # ADOPT, CAME, Prodigy, D-Adapt Lion, MoFaSGD
  python examples/finetune_lm.py --only 'AdamW (full),MLorc-AdamW r4'
  python examples/finetune_lm.py --out benchmarks/results   # regenerate the published results
"""

import argparse
import ast
import json
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import mlorc_optax as mlorc

RANK = 4
# The residual correction of the best configuration beside the paper's MLorc:
# c = 2 was within 2% of AdamW on both tasks of benchmarks/quality.py, c = 1
# on one. It does not help Lion, whose best variant tracks the momentum's
# subspace instead (warm_start; benchmarks/residual_study.py).
ADAMW_RESIDUAL_CORRECTION = 2.0
# Sizes of the default run and of --quick (a smoke run). The default's steps
# are set by time on 2 CPU cores: 400 + 8 x 200 steps took 11.8 minutes with
# the cores shared (load average 7); 300 + 8 x 150 take about 9 at that rate.
DEFAULT = dict(d=128, layers=2, heads=4, seq=128, batch=24, pretrain_steps=300, finetune_steps=150)
QUICK = dict(d=64, layers=1, heads=2, seq=32, batch=8, pretrain_steps=10, finetune_steps=6)
# The fine-tuning corpus: docstrings of these pure-Python standard-library
# files, read from disk (importing the modules instead would make the text
# depend on what else was imported before, and on installed packages).
DOC_FILES = (
    'argparse.py', 'asyncio/tasks.py', 'collections/__init__.py', 'csv.py', 'dataclasses.py',
    'datetime.py', 'difflib.py', 'email/message.py', 'enum.py', 'fractions.py', 'functools.py',
    'http/client.py', 'inspect.py', 'json/__init__.py', 'logging/__init__.py', 'pathlib.py',
    'pickle.py', 'random.py', 'shutil.py', 'statistics.py', 'string.py', 'subprocess.py',
    'textwrap.py', 'threading.py', 'typing.py', 'unittest/case.py', 'urllib/parse.py',
    'zipfile.py',
)
DOC_MIN_CHARS = 80  # shorter docstrings are mostly one-line signatures


# ----------------------------------------------------------------------------- data
def language_reference() -> str:
  """The Python language reference's topics as `pydoc` ships them, in key order."""
  from pydoc_data import topics

  return '\n'.join(topics.topics[k] for k in sorted(topics.topics))


def docstrings(source: str) -> list[str]:
  """The docstrings of a module's source: module, classes, functions, in source order."""
  nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  found = [n for n in ast.walk(ast.parse(source)) if isinstance(n, nodes)]
  found.sort(key=lambda n: getattr(n, 'lineno', 0))
  texts = (ast.get_docstring(n) for n in found)
  return [t for t in texts if t and len(t) > DOC_MIN_CHARS]


def stdlib_docstrings() -> str:
  """Docstrings of `DOC_FILES`, parsed (not imported) from the standard library."""
  root = sysconfig.get_paths()['stdlib']
  texts = []
  for name in DOC_FILES:
    with open(os.path.join(root, name), encoding='utf-8') as f:
      texts += docstrings(f.read())
  return '\n\n'.join(dict.fromkeys(texts))  # unique, in a fixed order


def corpora() -> tuple[str, str]:
  """The pretraining and fine-tuning texts: (language reference, stdlib docstrings).

  Both come from the Python installation's own files (`pydoc_data.topics` and
  the sources of `DOC_FILES`), read without importing anything else, so they
  depend only on the Python version: not on installed packages nor on what was
  imported before.
  """
  return language_reference(), stdlib_docstrings()


def encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('ascii', 'replace'), np.uint8).astype(np.int32)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq - 1, batch)
    yield jnp.asarray(np.stack([data[s : s + seq + 1] for s in starts]))


# ---------------------------------------------------------------------------- model
class Block(nnx.Module):

  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=heads, in_features=d, decode=False, rngs=rngs
    )
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class CharTransformer(nnx.Module):

  def __init__(self, d: int, layers: int, heads: int, seq: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
    self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.embed.attend(self.norm(x))


def loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# ----------------------------------------------------------------------------- LoRA
class LoRA(nnx.Module):
  """Trains rank-r adapters B @ A added to every frozen 2-D kernel (A random, B zero)."""

  def __init__(self, base: CharTransformer, rank: int, rngs: nnx.Rngs):
    self.base = base
    params = nnx.state(base, nnx.Param)
    flat = {k: v for k, v in nnx.to_flat_state(params)}
    self.keys = tuple(k for k, v in flat.items() if v[...].ndim == 2 and k[-1] == 'kernel')
    self.a = nnx.List([
        nnx.Param(jax.random.normal(rngs.params(), (flat[k][...].shape[0], rank)) / rank)
        for k in self.keys
    ])
    self.b = nnx.List([nnx.Param(jnp.zeros((rank, flat[k][...].shape[1]))) for k in self.keys])

  def merged(self) -> CharTransformer:
    graphdef, params, rest = nnx.split(self.base, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
    for k, a, b in zip(self.keys, self.a, self.b):
      flat[k] = flat[k].replace(jax.lax.stop_gradient(flat[k][...]) + a[...] @ b[...])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)

  def __call__(self, tokens):
    return self.merged()(tokens)


# ----------------------------------------------------------------------------- runs
def state_bytes(optimizer: nnx.Optimizer) -> int:
  leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
  return int(sum(x.size * x.dtype.itemsize for x in leaves if hasattr(x, 'dtype')))


def train(model, tx, data, steps, progress, wrt=nnx.Param):
  """Trains `model` in place; returns losses, median step seconds, optimizer.

  `progress` is a tqdm bar: it advances one per step and shows the mean loss
  of the last 10 steps.
  """
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)

  @nnx.jit
  def step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, tokens)
    optimizer.update(model, grads)
    return loss

  losses, times = [], []
  for tokens in (next(data) for _ in range(steps)):
    start = time.perf_counter()
    losses.append(float(step(model, optimizer, tokens)))
    times.append(time.perf_counter() - start)
    progress.set_postfix(loss=f'{np.mean(losses[-10:]):.3f}', refresh=False)
    progress.update(1)
  # The first steps compile; the median of the rest is the step time.
  return losses, float(np.median(times[2:])) if steps > 3 else float(np.mean(times)), optimizer


def windows(data: np.ndarray, seq: int) -> jax.Array:
  """All non-overlapping windows of seq + 1 tokens: a whole split, once each."""
  n = (len(data) - 1) // seq
  return jnp.asarray(np.stack([data[i * seq : i * seq + seq + 1] for i in range(n)]))


@nnx.jit
def evaluate(model, tokens: jax.Array) -> jax.Array:
  """Mean loss over `tokens` (windows), in one batch: a whole split fits."""
  return loss_fn(model, tokens)


def _schedule(steps: int):
  return lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps)


def optimizers(steps):
  """The paper's MLorc (rank 4), the best configuration beside it, and the usual alternatives."""
  schedule = _schedule(steps)
  return {
      'AdamW (full)': lambda: optax.adamw(schedule(1e-3), weight_decay=0.01),
      # No `compress`: the default compresses every kernel (attention included)
      # and the embedding; `mlorc.summarize` below shows what.
      'MLorc-AdamW r4': lambda: mlorc.adamw(schedule(1e-3), rank=RANK, weight_decay=0.01),
      'MLorc-AdamW r4 + residual correction': lambda: mlorc.adamw(
          schedule(1e-3), rank=RANK, weight_decay=0.01, residual_correction=ADAMW_RESIDUAL_CORRECTION
      ),
      'Lion (full)': lambda: optax.lion(schedule(1e-4), weight_decay=0.1),
      'MLorc-Lion r4': lambda: mlorc.lion(schedule(1e-4), rank=RANK, weight_decay=0.1),
      'MLorc-Lion r4 + warm start': lambda: mlorc.lion(
          schedule(1e-4), rank=RANK, weight_decay=0.1, warm_start=True
      ),
      # A projection refreshed 3 times in the run (optax's default gap of 200
      # would never refresh it here).
      'GaLore r4': lambda: optax.contrib.galore(schedule(1e-3), rank=RANK, update_proj_gap=50),
      'LoRA r4': lambda: optax.adamw(schedule(2e-3), weight_decay=0.0),
  }


def family_optimizers(steps):
  """The rest of the MLorc family at rank 4 beside its full-state versions
  (ADOPT and Prodigy also with residual correction)."""
  schedule = _schedule(steps)
  return {
      'ADOPT (full)': lambda: optax.contrib.adopt(schedule(1e-3)),
      'MLorc-ADOPT r4': lambda: mlorc.adopt(schedule(1e-3), rank=RANK),
      'MLorc-ADOPT r4 + residual correction': lambda: mlorc.adopt(
          schedule(1e-3), rank=RANK, residual_correction=ADAMW_RESIDUAL_CORRECTION
      ),
      'CAME (full)': lambda: mlorc.came(schedule(1e-3), compress=False),
      'MLorc-CAME r4': lambda: mlorc.came(schedule(1e-3), rank=RANK),
      'Prodigy (full)': lambda: mlorc.prodigy(schedule(1.0), s_stride=1, compress=False),
      'MLorc-Prodigy r4': lambda: mlorc.prodigy(schedule(1.0), rank=RANK),
      'MLorc-Prodigy r4 + residual correction': lambda: mlorc.prodigy(
          schedule(1.0), rank=RANK, residual_correction=ADAMW_RESIDUAL_CORRECTION
      ),
      'D-Adapt Lion (full)': lambda: mlorc.dadapt_lion(schedule(1.0), s_stride=1, compress=False),
      'MLorc-D-Adapt Lion r4': lambda: mlorc.dadapt_lion(schedule(1.0), rank=RANK),
      'MoFaSGD r4': lambda: mlorc.mofasgd(schedule(1e-2), rank=RANK, adam_learning_rate=schedule(1e-3)),
  }


def reference_of(name: str, family: bool) -> str:
  """The run a run's held-out loss is compared with.

  AdamW (full) in the main comparison; in `--family`, the same optimizer's
  full-state version ('MoFaSGD (full)' for MoFaSGD, which has none, so never run).
  """
  if not family:
    return 'AdamW (full)'
  return name.removeprefix('MLorc-').split(f' r{RANK}')[0] + ' (full)'


# --------------------------------------------------------------------------- report
COLUMNS = (
    # (row key, header, width, format, what it is)
    ('held_out_loss', 'held-out loss', 13, '.4f',
     'mean cross-entropy (nats/char) over the whole test split, never trained on'),
    ('held_out_ratio', 'vs {ref}', 9, '.3f',
     'held-out loss over {ref_long}; below 1 is better'),
    ('final_train_loss', 'last-10 train', 13, '.4f', 'mean training loss of the last 10 fine-tuning steps'),
    ('state_MiB', 'state MiB', 9, '.3f', 'optimizer state (moments, factors, counts) in MiB'),
    ('step_ms', 'step ms', 8, '.1f', 'median wall time of one training step (forward, backward, update)'),
)


def table(rows, family: bool) -> str:
  """The results as text: a header naming each column, the rows, and what each column is."""
  ref, ref_long = ('full', "the same optimizer's full-state version") if family else (
      'AdamW', "full AdamW's")
  width = max(len(r['optimizer']) for r in rows)
  header = f"{'optimizer':{width}s}" + ''.join(
      f" {h.format(ref=ref):>{w}s}" for _, h, w, _, _ in COLUMNS)
  lines = [header, '-' * len(header)]
  for r in rows:
    cells = (f" {'-':>{w}s}" if r[k] is None else f" {r[k]:{w}{fmt}}" for k, _, w, fmt, _ in COLUMNS)
    lines.append(f"{r['optimizer']:{width}s}" + ''.join(cells))
  lines.append('')
  lines += [f'  {h.format(ref=ref):>13s}: {what.format(ref_long=ref_long)}' for _, h, _, _, what in COLUMNS]
  return '\n'.join(lines)


def style(name: str, index: int) -> dict:
  """Colour by run (tab10), dash by kind: full state solid, MLorc dashed, its variants dash-dot."""
  import matplotlib

  dashes = '-.' if ' + ' in name else '--' if name.startswith('MLorc') else '-'
  return dict(color=matplotlib.colormaps['tab10'](index % 10), linestyle=dashes)


def plot(curves, held_out, before, path, title):
  """Two panels: training-loss curves, and the held-out losses as bars; the legend below both."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw=dict(width_ratios=(3, 2)))
  names = list(curves)
  window = max(len(curves[names[0]]) // 20, 1)
  for i, name in enumerate(names):
    smooth = np.convolve(curves[name], np.ones(window) / window, mode='valid')
    ax.plot(np.arange(len(smooth)) + window, smooth, label=name, linewidth=1.4, **style(name, i))
  ax.set_xlabel('fine-tuning step')
  ax.set_ylabel(f'training loss (moving average of {window} steps)')
  ax.grid(alpha=0.3)

  y = np.arange(len(names))[::-1]
  for i, name in enumerate(names):
    bars.barh(y[i], held_out[name], color=style(name, i)['color'],
              hatch='//' if name.startswith('MLorc') else None, edgecolor='white')
    bars.text(held_out[name], y[i], f' {held_out[name]:.3f}', va='center', fontsize=8)
  bars.axvline(before, color='gray', linestyle=':', label='held-out loss before fine-tuning')
  bars.set_yticks(y, names, fontsize=8)
  low = min(held_out.values())
  bars.set_xlim(low - 0.15 * (before - low) - 1e-3, before + 0.1 * (before - low) + 1e-3)
  bars.set_xlabel('held-out loss after fine-tuning (test split)')

  fig.suptitle(title)
  # Below both panels, so that it hides no curve.
  handles, labels = (a + b for a, b in zip(ax.get_legend_handles_labels(), bars.get_legend_handles_labels()))
  fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.03 + 0.035 * ((len(labels) + 2) // 3), 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='tiny model and few steps (a smoke run)')
  parser.add_argument('--family', action='store_true',
                      help='ADOPT, CAME, Prodigy, D-Adapt Lion and MoFaSGD instead (finetune_family_*)')
  parser.add_argument('--out', default='finetune_lm_out',
                      help='directory for the JSON and the plot (default: %(default)s); '
                           '--out benchmarks/results regenerates the published results')
  parser.add_argument('--only', type=lambda s: s.split(','), default=None, metavar='NAME,NAME',
                      help='run only these optimizers (names as in the table)')
  args = parser.parse_args(argv)
  config = QUICK if args.quick else DEFAULT
  d, layers, heads, seq, batch = (config[k] for k in ('d', 'layers', 'heads', 'seq', 'batch'))
  pre_steps, ft_steps = config['pretrain_steps'], config['finetune_steps']

  pretrain_text, finetune_text = corpora()
  pre, docs = encode(pretrain_text), encode(finetune_text)
  cut = int(0.9 * len(docs))
  ft_train, ft_test = docs[:cut], windows(docs[cut:], seq)
  print(f'pretraining corpus {len(pre):,} chars; fine-tuning corpus {len(docs):,} chars, '
        f'the last 10% ({len(ft_test)} windows of {seq}) held out for testing')

  runs = family_optimizers(ft_steps) if args.family else optimizers(ft_steps)
  if args.only:
    if unknown := set(args.only) - set(runs):
      parser.error(f'unknown optimizers {sorted(unknown)}; choose from {list(runs)}')
    runs = {name: make for name, make in runs.items() if name in args.only}
  width = max(map(len, runs))
  bar = lambda desc, total: tqdm(total=total, desc=f'{desc:{width}s}', unit='step', leave=True)
  model = CharTransformer(d, layers, heads, seq, nnx.Rngs(0))
  with bar('pretraining (AdamW)', pre_steps) as progress:
    pre_losses, _, _ = train(model, optax.adamw(3e-3), batches(pre, batch, seq, 0), pre_steps, progress)
  pretrained = nnx.state(model)
  graphdef = nnx.graphdef(model)
  base_loss = float(evaluate(model, ft_test))
  if 'MLorc-AdamW r4' in runs:
    print('\nWhat MLorc-AdamW compresses in this model:')
    mlorc.summarize(runs['MLorc-AdamW r4'](), nnx.state(model, nnx.Param))
    print()

  rows, curves = [], {}
  for name, make in runs.items():
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, pretrained))
    if name.startswith('LoRA'):
      model = LoRA(model, RANK, nnx.Rngs(1))
      wrt = nnx.Any(nnx.PathContains('a'), nnx.PathContains('b'))
    else:
      wrt = nnx.Param
    with bar(name, ft_steps) as progress:
      losses, step_s, optimizer = train(
          model, make(), batches(ft_train, batch, seq, 1), ft_steps, progress, wrt=wrt
      )
    curves[name] = losses
    rows.append(dict(
        optimizer=name, held_out_loss=float(evaluate(model, ft_test)), held_out_ratio=None,
        final_train_loss=float(np.mean(losses[-10:])), state_MiB=state_bytes(optimizer) / 2**20,
        step_ms=1e3 * step_s,
    ))
  by_name = {r['optimizer']: r for r in rows}
  for r in rows:
    ref = reference_of(r['optimizer'], args.family)
    if ref in by_name:
      r['held_out_ratio'] = r['held_out_loss'] / by_name[ref]['held_out_loss']

  print(f'\nFine-tuned {ft_steps} steps from the same pretrained weights '
        f'(held-out loss before fine-tuning: {base_loss:.4f}):\n')
  print(table(rows, args.family))

  os.makedirs(args.out, exist_ok=True)
  example = 'finetune_family' if args.family else 'finetune_lm'
  stem = os.path.join(args.out, f"{example}_{'quick' if args.quick else jax.devices()[0].platform}")
  result = dict(
      example=example, device=str(jax.devices()[0].device_kind),
      jax=jax.__version__,
      config=dict(config, rank=RANK, adamw_residual_correction=ADAMW_RESIDUAL_CORRECTION),
      held_out_before=base_loss,
      held_out_ratio_to="the same optimizer's full-state version" if args.family else 'AdamW (full)',
      rows=rows, pretrain_final_loss=float(np.mean(pre_losses[-10:])),
  )
  with open(f'{stem}.json', 'w') as f:
    json.dump(result, f, indent=1)
  plot(curves, {r['optimizer']: r['held_out_loss'] for r in rows}, base_loss, f'{stem}.png',
       f'Fine-tuning a {layers}-layer char transformer (pretrained on the Python language '
       f'reference)\non standard-library docstrings, {ft_steps} steps, rank {RANK}')
  print(f'\nwrote {stem}.json and {stem}.png (in {os.path.abspath(args.out)})')
  return result


if __name__ == '__main__':
  main()
