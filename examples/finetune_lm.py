"""Fine-tune a small Flax NNX transformer with MLorc and the usual alternatives.

A character-level transformer is pretrained briefly on the Python language
reference that ships with Python (``pydoc_data.topics``), then fine-tuned on
another corpus that ships with it: the docstrings of standard-library modules.
The fine-tuning run is repeated from the same pretrained weights with full
AdamW, MLorc-AdamW (rank 4), MLorc-Lion (rank 4), Lion, GaLore (rank 4, from
optax.contrib) and LoRA (rank 4, a small implementation of our own), and the
script prints held-out loss, optimizer-state size and step time, and saves a
loss-curve plot.

  python examples/finetune_lm.py            # about 5 minutes on 2 CPU cores
  python examples/finetune_lm.py --quick    # a smoke run, used by the tests
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
    progress.update(1)
  return losses, float(np.median(times[2:])) if steps > 3 else float(np.mean(times)), optimizer


def evaluate(model, data, batches_):
  scores = nnx.jit(loss_fn)
  return float(np.mean([float(scores(model, next(data))) for _ in range(batches_)]))


def optimizers(steps):
  schedule = lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps)
  return {
      'AdamW (full)': lambda: optax.adamw(schedule(1e-3), weight_decay=0.01),
      # No `compress`: the default compresses every kernel (attention included)
      # and the embedding; `mlorc.summarize` below shows what.
      'MLorc-AdamW r4': lambda: mlorc.adamw(schedule(1e-3), rank=RANK, weight_decay=0.01),
      'Lion (full)': lambda: optax.lion(schedule(1e-4), weight_decay=0.1),
      'MLorc-Lion r4': lambda: mlorc.lion(schedule(1e-4), rank=RANK, weight_decay=0.1),
      'GaLore r4': lambda: optax.contrib.galore(schedule(1e-3), rank=RANK, update_proj_gap=200),
      'LoRA r4': lambda: optax.adamw(schedule(2e-3), weight_decay=0.0),
  }


def family_optimizers(steps):
  """The rest of the MLorc family at rank 4 beside its full-state versions."""
  schedule = lambda peak: optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps)
  return {
      'ADOPT (full)': lambda: optax.contrib.adopt(schedule(1e-3)),
      'MLorc-ADOPT r4': lambda: mlorc.adopt(schedule(1e-3), rank=RANK),
      'CAME (full)': lambda: mlorc.came(schedule(1e-3), compress=False),
      'MLorc-CAME r4': lambda: mlorc.came(schedule(1e-3), rank=RANK),
      'Prodigy (full)': lambda: mlorc.prodigy(schedule(1.0), s_stride=1, compress=False),
      'MLorc-Prodigy r4': lambda: mlorc.prodigy(schedule(1.0), rank=RANK),
      'D-Adapt Lion (full)': lambda: mlorc.dadapt_lion(schedule(1.0), s_stride=1, compress=False),
      'MLorc-D-Adapt Lion r4': lambda: mlorc.dadapt_lion(schedule(1.0), rank=RANK),
      'MoFaSGD r4': lambda: mlorc.mofasgd(schedule(1e-2), rank=RANK, adam_learning_rate=schedule(1e-3)),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='tiny model and few steps')
  parser.add_argument('--family', action='store_true',
                      help='ADOPT, CAME, Prodigy, D-Adapt Lion and MoFaSGD instead (finetune_family_*.json)')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'results'))
  args = parser.parse_args(argv)
  if args.quick:
    d, layers, heads, seq, batch, pre_steps, ft_steps, eval_batches = 64, 1, 2, 32, 8, 10, 6, 2
  else:
    d, layers, heads, seq, batch, pre_steps, ft_steps, eval_batches = 128, 2, 4, 128, 32, 600, 300, 20

  pre = encode(language_reference())
  docs = encode(stdlib_docstrings())
  cut = int(0.9 * len(docs))
  ft_train, ft_test = docs[:cut], docs[cut:]
  print(f'pretraining corpus {len(pre):,} chars, fine-tuning corpus {len(docs):,} chars')

  runs = family_optimizers(ft_steps) if args.family else optimizers(ft_steps)
  progress = tqdm(total=pre_steps + ft_steps * len(runs), desc='training', disable=None)
  model = CharTransformer(d, layers, heads, seq, nnx.Rngs(0))
  pre_losses, _, _ = train(model, optax.adamw(3e-3), batches(pre, batch, seq, 0), pre_steps, progress)
  pretrained = nnx.state(model)
  graphdef = nnx.graphdef(model)
  base_loss = evaluate(model, batches(ft_test, batch, seq, 99), eval_batches)
  if not args.family:
    print('\nWhat MLorc-AdamW compresses in this model:')
    mlorc.summarize(runs['MLorc-AdamW r4'](), nnx.state(model, nnx.Param))

  rows, curves = [], {}
  for name, make in runs.items():
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, pretrained))
    if name.startswith('LoRA'):
      model = LoRA(model, RANK, nnx.Rngs(1))
      wrt = nnx.Any(nnx.PathContains('a'), nnx.PathContains('b'))
    else:
      wrt = nnx.Param
    losses, step_s, optimizer = train(
        model, make(), batches(ft_train, batch, seq, 1), ft_steps, progress, wrt=wrt
    )
    held_out = evaluate(model, batches(ft_test, batch, seq, 99), eval_batches)
    curves[name] = losses
    rows.append(dict(
        optimizer=name, held_out_loss=held_out, final_train_loss=float(np.mean(losses[-10:])),
        state_MiB=state_bytes(optimizer) / 2**20, step_ms=1e3 * step_s,
    ))
  progress.close()

  print(f'\nheld-out loss before fine-tuning: {base_loss:.4f}')
  header = f"{'optimizer':22s} {'held-out loss':>13s} {'train loss':>10s} {'state MiB':>9s} {'step ms':>8s}"
  print(header)
  for r in rows:
    print(f"{r['optimizer']:22s} {r['held_out_loss']:13.4f} {r['final_train_loss']:10.4f} "
          f"{r['state_MiB']:9.3f} {r['step_ms']:8.1f}")

  os.makedirs(args.out, exist_ok=True)
  tag = 'quick' if args.quick else jax.devices()[0].platform
  name = 'finetune_family' if args.family else 'finetune_lm'
  result = dict(
      example=name, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
      config=dict(d=d, layers=layers, heads=heads, seq=seq, batch=batch, pretrain_steps=pre_steps,
                  finetune_steps=ft_steps, rank=RANK),
      held_out_before=base_loss, rows=rows, pretrain_final_loss=float(np.mean(pre_losses[-10:])),
  )
  with open(os.path.join(args.out, f'{name}_{tag}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(curves, os.path.join(args.out, f'{name}_{tag}.png'))
  return result


def plot(curves, path):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, losses in curves.items():
    window = max(len(losses) // 20, 1)
    smooth = np.convolve(losses, np.ones(window) / window, mode='valid')
    ax.plot(np.arange(len(smooth)) + window, smooth, label=name)
  ax.set_xlabel('fine-tuning step')
  ax.set_ylabel('training loss (moving average)')
  ax.set_title('Fine-tuning a char transformer on stdlib docstrings')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print('saved', path)


if __name__ == '__main__':
  main()
