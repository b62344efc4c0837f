"""Fine-tuning quality: MLorc against full-state and low-rank optimizers.

Two fine-tuning tasks of different kinds, each pretrained briefly (once,
deterministically) and then fine-tuned from the same weights by every method:

  lm      the byte-level transformer of examples/finetune_lm.py, pretrained on
          one corpus that ships with Python and fine-tuned on another; the
          fine-tuning text is split contiguously into train / validation /
          test (80/10/10).
  digits  a small convolutional net on scikit-learn's bundled 8x8 digits,
          pretrained on the digits 0-4 and fine-tuned on noisy digits 5-9
          (pixel noise of std 0.3; a 60/20/20 split of those images), with a
          fresh random shift and noise on every training batch, and each
          validation and test image seen under 4 fixed noises.

Protocol, per task and method: fine-tune at seed 0 with each learning rate
of a small grid (multiples of the task's base rate for the method's kind),
extended past an edge that holds the best (up to twice), keep the rate with
the lowest validation loss, and run seeds 1 and 2 at it;
report the test loss (mean and standard deviation over the 3 seeds), its
ratio to AdamW's (Lion's for the Lion variants), the chosen rate, the grid's
validation losses and the optimizer state in bytes, measured from the real
state. A seed changes the fine-tuning batches, the LoRA initialisation and
MLorc's random test matrices; the pretrained model stays the same. Every
schedule is warmup (10%) and cosine decay to 0.

Results go to benchmarks/results/quality_<platform>.json after every run (so
that --resume can continue an interrupted run) and a Pareto plot, state bytes
against test loss, to quality_<platform>.png.

  python benchmarks/quality.py                       # the full run (see the estimate it prints)
  python benchmarks/quality.py --quick               # smoke run into a temporary directory
  python benchmarks/quality.py --tasks digits --methods 'AdamW,MLorc-AdamW r4' --resume
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import traverse_util
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'examples'))
import common  # noqa: E402
import finetune_lm  # noqa: E402
import mlorc_optax as mlorc  # noqa: E402

SEEDS = (0, 1, 2)
GRID = (0.5, 1.0, 2.0)  # multiples of the task's base learning rate, tried at seed 0
GRID_EXTENSIONS = 2  # steps past an edge of GRID where the best rate lies
QUICK_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}  # about 1/4 less compile time


# --------------------------------------------------------------------------- methods
def galore(learning_rate, *, rank: int, update_proj_gap: int, weight_decay: float):
  """optax.contrib.galore projecting the matrices MLorc compresses at this rank.

  Left to itself GaLore projects 2-D parameters only, which would leave the
  3-D attention and 4-D convolution kernels with full Adam moments; here it
  sees every parameter through MLorc's default matrix view instead, so both
  compress the same matrices.
  """

  def dimension_numbers(params):
    views = mlorc.resolve_views(params, None, rank=rank)
    return jax.tree.map(
        lambda v, p: _galore_dims(v, p.ndim), views, params,
        is_leaf=lambda x: x is None or isinstance(x, mlorc.MatrixView),
    )

  return optax.contrib.galore(
      learning_rate, rank=rank, update_proj_gap=update_proj_gap,
      weight_decay=weight_decay, weight_dimension_numbers=dimension_numbers,
  )


def _galore_dims(view, ndim):
  if view is None or len(view.rows) + len(view.cols) != ndim:  # no batch axes here
    return None
  return optax.contrib.GaLoreDimensionNumbers(view.rows, view.cols)


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimizer configuration: `factory(schedule, **kwargs)` (plus `seed=`).

  Attributes:
    factory: builds the optimizer from a learning-rate schedule.
    kwargs: its other arguments (JSON-serialisable; recorded with the results).
    lr: which of the task's base learning rates the grid multiplies.
    grid: multiples of that rate tried at seed 0; () with `lr_from`.
    lr_from: take this method's chosen rate instead of tuning one.
    reference: the method whose mean test loss the ratio divides by.
    seeded: the optimizer takes `seed` (MLorc's random test matrices).
    lora: rank of LoRA adapters trained instead of the weights; 0 for none.
    rank: rank of the stored state, for the plot; None for full state.
  """

  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  lr: str = 'adam'
  grid: tuple[float, ...] = GRID
  lr_from: str | None = None
  reference: str = 'AdamW'
  seeded: bool = False
  lora: int = 0
  rank: int | None = None

  def build(self, schedule, seed: int) -> optax.GradientTransformation:
    return self.factory(schedule, **self.kwargs, **({'seed': seed} if self.seeded else {}))

  def spec(self) -> dict[str, Any]:
    """What the results depend on; a changed spec invalidates stored runs."""
    return dict(
        factory=f'{self.factory.__module__}.{self.factory.__qualname__}', kwargs=self.kwargs,
        lr=self.lr, grid=list(self.grid), lr_from=self.lr_from, seeded=self.seeded, lora=self.lora,
    )


# Weight decay as in examples/finetune_lm.py: 0.01 for the AdamW-like, 0.1 for
# the Lion-like, none on LoRA's adapters. Adafactor keeps optax's default of
# no weight decay (its `weight_decay_rate` is not scaled by the learning rate).
# GaLore refreshes its projections every 100 steps (several times a run).
METHODS: dict[str, Method] = {
    'AdamW': Method(optax.adamw, dict(weight_decay=0.01)),
    'Lion': Method(optax.lion, dict(weight_decay=0.1), lr='lion', reference='Lion'),
    'Adafactor': Method(optax.adafactor, {}, lr='adafactor'),
    'GaLore r4': Method(
        galore, dict(rank=4, update_proj_gap=100, weight_decay=0.01), lr='galore', rank=4
    ),
    'LoRA r4': Method(optax.adamw, dict(weight_decay=0.0), lr='lora', lora=4, rank=4),
    'MLorc-AdamW r4': Method(
        mlorc.adamw, dict(rank=4, weight_decay=0.01), lr='mlorc_adam', seeded=True, rank=4
    ),
    'MLorc-AdamW r4 +res': Method(
        mlorc.adamw, dict(rank=4, weight_decay=0.01, residual_correction=1.0), lr='mlorc_adam',
        seeded=True, rank=4,
    ),
    # Twice the discarded momentum: the sweep's other candidate (residual_study.py).
    'MLorc-AdamW r4 +res c=2': Method(
        mlorc.adamw, dict(rank=4, weight_decay=0.01, residual_correction=2.0), lr='mlorc_adam',
        seeded=True, rank=4,
    ),
    'MLorc-Lion r4': Method(
        mlorc.lion, dict(rank=4, weight_decay=0.1), lr='mlorc_lion', reference='Lion', seeded=True,
        rank=4,
    ),
    # Residual correction does not help Lion (benchmarks/residual_study.py):
    # its best variant there tracks the momentum's subspace instead.
    'MLorc-Lion r4 +warm': Method(
        mlorc.lion, dict(rank=4, weight_decay=0.1, warm_start=True),
        lr='mlorc_lion', reference='Lion', seeded=True, rank=4,
    ),
    # A shorter Lion momentum (b2 0.99 -> 0.95) loses less to truncation; its
    # full-state twin is the fair reference.
    'Lion b2=0.95': Method(
        optax.lion, dict(b2=0.95, weight_decay=0.1), lr='lion', reference='Lion b2=0.95'
    ),
    'MLorc-Lion r4 b2=0.95': Method(
        mlorc.lion, dict(b2=0.95, rank=4, weight_decay=0.1), lr='mlorc_lion',
        reference='Lion b2=0.95', seeded=True, rank=4,
    ),
    # The frontier: higher ranks at MLorc-AdamW r4's chosen rate, no grid of their own.
    'MLorc-AdamW r8': Method(
        mlorc.adamw, dict(rank=8, weight_decay=0.01), grid=(), lr_from='MLorc-AdamW r4', seeded=True, rank=8
    ),
    'MLorc-AdamW r16': Method(
        mlorc.adamw, dict(rank=16, weight_decay=0.01), grid=(), lr_from='MLorc-AdamW r4', seeded=True, rank=16
    ),
}


# ----------------------------------------------------------------------------- tasks
# Base (middle) learning rate of each kind of method, per task: the centres of
# wider seed-0 sweeps at these step counts on the shared 2-core CPU (factor 2
# apart). The low-rank methods preferred rates 2-4x AdamW's.
LM_LR = dict(adam=4e-3, mlorc_adam=8e-3, lion=8e-4, mlorc_lion=8e-4, adafactor=3e-2, galore=8e-3,
             lora=1.6e-2)
DIGITS_LR = dict(adam=8e-3, mlorc_adam=8e-3, lion=8e-4, mlorc_lion=1.6e-3, adafactor=1e-1,
                 galore=4e-2, lora=3.2e-2)

@dataclasses.dataclass
class Task:
  """A pretrained model and its fine-tuning data.

  `loss(model, batch)` is the mean loss of a batch; `train(seed)` yields
  fine-tuning batches; `val` and `test` are fixed lists of equal-size batches.
  """

  name: str
  model: nnx.Module
  loss: Callable[[nnx.Module, Any], jax.Array]
  train: Callable[[int], Iterator[Any]]
  val: list[Any]
  test: list[Any]
  steps: int
  lr: dict[str, float]  # base peak learning rate per kind of method
  config: dict[str, Any]
  lora_full: tuple[str, ...] = ()  # top-level parameters LoRA trains in full (a new head)
  accuracy: Callable[[nnx.Module, Any], jax.Array] | None = None
  pretrain_step_s: float = 0.0


def _pretrain(model, loss, batches, steps, lr, desc):
  """AdamW with warmup-cosine; returns the median step time in seconds."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr / 10)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    value, grads = nnx.value_and_grad(loss)(model, batch)
    optimizer.update(model, grads)
    return value

  times = []
  for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
    start = time.perf_counter()
    float(step(model, optimizer, next(batches)))
    times.append(time.perf_counter() - start)
  return float(np.median(times[1:])) if steps > 1 else times[0]


def _windows(data: np.ndarray, seq: int, batch: int, max_batches: int) -> list[jax.Array]:
  """Non-overlapping (seq + 1)-token windows of `data` in equal-size batches."""
  n = min((len(data) - 1) // seq, batch * max_batches) // batch * batch
  rows = np.stack([data[i * seq : i * seq + seq + 1] for i in range(n)])
  return [jnp.asarray(rows[i : i + batch]) for i in range(0, n, batch)]


def lm_task(quick: bool, **overrides) -> Task:
  if quick:
    cfg = dict(d=64, layers=1, heads=2, seq=32, batch=8, pretrain_steps=20, steps=8, eval_batches=2)
  else:
    cfg = dict(d=128, layers=2, heads=4, seq=64, batch=32, pretrain_steps=600, steps=300,
               eval_batches=12)
  cfg.update(overrides)
  pre_text, ft_text = finetune_lm.corpora()
  pre, ft = finetune_lm.encode(pre_text), finetune_lm.encode(ft_text)
  cut1, cut2 = int(0.8 * len(ft)), int(0.9 * len(ft))
  train, val, test = ft[:cut1], ft[cut1:cut2], ft[cut2:]
  cfg.update(pretrain_chars=len(pre), train_chars=len(train), val_chars=len(val), test_chars=len(test))
  seq, batch = cfg['seq'], cfg['batch']
  model = finetune_lm.CharTransformer(cfg['d'], cfg['layers'], cfg['heads'], seq, nnx.Rngs(0))
  step_s = _pretrain(model, finetune_lm.loss_fn, finetune_lm.batches(pre, batch, seq, 0),
                     cfg['pretrain_steps'], 3e-3, 'lm pretraining')
  return Task(
      name='lm', model=model, loss=finetune_lm.loss_fn,
      train=lambda seed: finetune_lm.batches(train, batch, seq, 1000 + seed),
      val=_windows(val, seq, batch, cfg['eval_batches']),
      test=_windows(test, seq, batch, cfg['eval_batches']),
      steps=cfg['steps'], lr=LM_LR,
      config=cfg, pretrain_step_s=step_s,
  )


class DigitsNet(nnx.Module):
  """Three 3x3 convolutions and three dense layers; all but conv1 and the head
  are large enough (both matrix sides >= 64) for MLorc's default policy."""

  def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, width // 2, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width // 2, width, (3, 3), rngs=rngs)  # a (9 width/2, width) matrix
    self.conv3 = nnx.Conv(width, width, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(16 * width, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, images):
    x = nnx.gelu(self.conv1(images[..., None]))
    x = nnx.avg_pool(nnx.gelu(self.conv2(x)), (2, 2), strides=(2, 2))  # 8x8 -> 4x4
    x = nnx.gelu(self.conv3(x)).reshape(images.shape[0], -1)
    return self.head(nnx.gelu(self.fc2(nnx.gelu(self.fc1(x)))))


def digits_loss(model, batch):
  images, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()


def digits_accuracy(model, batch):
  images, labels = batch
  return (model(images).argmax(-1) == labels).mean()


def augmented(images: np.ndarray, labels: np.ndarray, batch: int, seed: int, noise: float):
  """Endless batches, each image shifted by up to a pixel and noised afresh."""
  rng = np.random.default_rng(seed)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
  grid = np.arange(8)
  while True:
    idx = rng.integers(0, len(images), batch)
    dy, dx = rng.integers(0, 3, (2, batch, 1, 1))
    crops = padded[idx[:, None, None], grid[None, :, None] + dy, grid[None, None, :] + dx]
    crops = crops + noise * rng.standard_normal(crops.shape)
    yield jnp.asarray(crops, jnp.float32), jnp.asarray(labels[idx])


def _noisy(images, labels, noise: float, draws: int, seed: int):
  """A fixed evaluation batch: every image `draws` times, each with its own noise."""
  rng = np.random.default_rng(seed)
  images = np.repeat(images, draws, axis=0)
  images = images + noise * rng.standard_normal(images.shape)
  return jnp.asarray(images, jnp.float32), jnp.asarray(np.repeat(labels, draws))


def digits_task(quick: bool, **overrides) -> Task:
  """Digits 0-4 (light noise) for pretraining, noisy digits 5-9 for fine-tuning.

  The fine-tuning domain's pixel noise makes its loss floor well above zero,
  so that the held-out loss does not hang on a handful of misread images; the
  validation and test images are each seen under `eval_draws` fixed noises.
  """
  from sklearn.datasets import load_digits

  if quick:
    cfg = dict(width=64, hidden=64, batch=16, pretrain_steps=20, steps=8)
  else:
    cfg = dict(width=64, hidden=128, batch=64, pretrain_steps=400, steps=400)
  cfg.update(pretrain_noise=0.1, noise=0.3, eval_draws=4, invert=False)
  cfg.update(overrides)
  data = load_digits()
  images, labels = data.images / 16.0, data.target
  order = np.random.default_rng(0).permutation(len(images))
  images, labels = images[order], labels[order]
  pre, ft = labels < 5, labels >= 5
  ft_images, ft_labels = images[ft], labels[ft]
  if cfg['invert']:
    ft_images = 1.0 - ft_images
  cut1, cut2 = int(0.6 * len(ft_images)), int(0.8 * len(ft_images))
  cfg.update(pretrain_images=int(pre.sum()), train_images=cut1, val_images=cut2 - cut1,
             test_images=len(ft_images) - cut2)
  model = DigitsNet(cfg['width'], cfg['hidden'], nnx.Rngs(0))
  batch, noise, draws = cfg['batch'], cfg['noise'], cfg['eval_draws']
  step_s = _pretrain(
      model, digits_loss, augmented(images[pre], labels[pre], batch, 0, cfg['pretrain_noise']),
      cfg['pretrain_steps'], 3e-3, 'digits pretraining',
  )
  return Task(
      name='digits', model=model, loss=digits_loss,
      train=lambda seed: augmented(ft_images[:cut1], ft_labels[:cut1], batch, 1000 + seed, noise),
      val=[_noisy(ft_images[cut1:cut2], ft_labels[cut1:cut2], noise, draws, 1)],
      test=[_noisy(ft_images[cut2:], ft_labels[cut2:], noise, draws, 2)],
      steps=cfg['steps'], lr=DIGITS_LR,
      config=cfg, lora_full=('head',), accuracy=digits_accuracy, pretrain_step_s=step_s,
  )


TASKS = {'lm': lm_task, 'digits': digits_task}


# ------------------------------------------------------------------------------ LoRA
def _key(path) -> str:
  return '/'.join(str(k) for k in path)


def lora_split(params, rank: int, seed: int, full: tuple[str, ...]):
  """(trainable, frozen, merge): rank-`rank` adapters for a pure-dict `params`.

  Every parameter MLorc compresses at this rank (its matrix view's rows being
  leading axes, as in every Flax kernel here) gets W + (A B).reshape(W.shape),
  A (m, r) Gaussian / r and B (r, n) zero, as in examples/finetune_lm.py; the
  top-level entries named in `full` train in full; the rest stays frozen.
  `merge(trainable, frozen)` gives the parameters the model sees.
  """
  views = traverse_util.flatten_dict(
      mlorc.resolve_views(params, None, rank=rank), keep_empty_nodes=True
  )
  flat = traverse_util.flatten_dict(params)
  adapted = {
      p: v for p, v in views.items()
      if v is not None and p[0] not in full and v.rows == tuple(range(len(v.rows)))
  }
  keys = jax.random.split(jax.random.key(seed), max(len(adapted), 1))
  a, b = {}, {}
  for k, (path, view) in zip(keys, adapted.items()):
    shape = flat[path].shape
    m = math.prod(shape[: len(view.rows)])
    a[_key(path)] = jax.random.normal(k, (m, rank)) / rank
    b[_key(path)] = jnp.zeros((rank, math.prod(shape) // m))
  trainable = dict(a=a, b=b, full={_key(p): x for p, x in flat.items() if p[0] in full})
  frozen = {_key(p): x for p, x in flat.items() if p[0] not in full}
  paths = {_key(p): p for p in flat}

  def merge(trainable, frozen):
    merged = {}
    for k, path in paths.items():
      if k in trainable['full']:
        merged[path] = trainable['full'][k]
      elif k in trainable['a']:
        w = frozen[k]
        merged[path] = w + (trainable['a'][k] @ trainable['b'][k]).reshape(w.shape)
      else:
        merged[path] = frozen[k]
    return traverse_util.unflatten_dict(merged)

  return trainable, frozen, merge


# ------------------------------------------------------------------------------ runs
def state_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, 'nbytes')))


class Runner:
  """Fine-tunes a task's pretrained model, one compiled step per optimizer.

  The peak learning rate enters the compiled step as an argument scaling the
  whole update (every optimizer here applies its learning rate last), so the
  runs of a grid share one compilation. `compiler_options` go to every
  step's compilation (--quick lowers XLA's optimisation level: its numbers
  are not for reading, and compiling MLorc's update is most of its time).
  """

  def __init__(self, task: Task, compiler_options: dict[str, Any] | None = None):
    self.task = task
    self.compiler_options = compiler_options
    self.graphdef, params, self.rest = nnx.split(task.model, nnx.Param, ...)
    self.params = nnx.to_pure_dict(params)
    self.steps_cache = {}
    apply = lambda params, batch, fn: fn(nnx.merge(self.graphdef, params, self.rest), batch)
    self.evaluate_fn = jax.jit(apply, static_argnums=2)

  def evaluate(self, params, batches, fn=None) -> float:
    fn = fn or self.task.loss
    return float(np.mean([float(self.evaluate_fn(params, b, fn)) for b in batches]))

  def _step(self, name: str, method: Method, seed: int, merge):
    key = (name, seed if method.seeded else None)
    if key not in self.steps_cache:
      steps = self.task.steps
      schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(steps // 10, 1), steps)
      tx = method.build(schedule, seed)
      task, graphdef, rest = self.task, self.graphdef, self.rest
      loss = lambda t, frozen, batch: task.loss(nnx.merge(graphdef, merge(t, frozen), rest), batch)

      @functools.partial(jax.jit, compiler_options=self.compiler_options)
      def step(trainable, frozen, opt_state, batch, peak_lr):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        updates = jax.tree.map(lambda u: (peak_lr * u).astype(u.dtype), updates)
        return optax.apply_updates(trainable, updates), opt_state, value

      self.steps_cache[key] = (tx, step)
    return self.steps_cache[key]

  def run(self, name: str, method: Method, lr: float, seed: int, desc: str) -> dict[str, Any]:
    params = jax.tree.map(jnp.copy, self.params)
    if method.lora:
      trainable, frozen, merge = lora_split(params, method.lora, seed, self.task.lora_full)
      extra = dict(adapter_bytes=state_bytes(trainable))
    else:
      trainable, frozen, merge, extra = params, {}, (lambda t, f: t), {}
    tx, step = self._step(name, method, seed, merge)  # merge is the same function for every seed
    opt_state = tx.init(trainable)
    batches, losses, times = self.task.train(seed), [], []
    peak = jnp.asarray(lr, jnp.float32)
    for _ in tqdm(range(self.task.steps), desc=desc, leave=False, disable=None):
      batch = next(batches)
      start = time.perf_counter()
      trainable, opt_state, value = step(trainable, frozen, opt_state, batch, peak)
      losses.append(float(value))
      times.append(time.perf_counter() - start)
    final = merge(trainable, frozen)
    record = dict(
        method=name, lr=lr, seed=seed,
        val_loss=self.evaluate(final, self.task.val), test_loss=self.evaluate(final, self.task.test),
        train_loss_end=float(np.mean(losses[-max(len(losses) // 10, 1):])),
        state_bytes=state_bytes(opt_state), first_step_s=times[0],
        step_ms=1e3 * float(np.median(times[1:] if len(times) > 1 else times)), **extra,
    )
    if self.task.accuracy is not None:
      record['test_accuracy'] = self.evaluate(final, self.task.test, self.task.accuracy)
    return record


# --------------------------------------------------------------------------- protocol
def _find(runs, name, lr, seed):
  for r in runs:
    if r['method'] == name and r['seed'] == seed and math.isclose(r['lr'], lr, rel_tol=1e-9):
      return r
  return None


def grid_rates(task_runs, name: str, base: dict[str, float], method: Method) -> list[float]:
  """The learning rates to try at seed 0: the method's grid, extended by its
  spacing past the edge that holds the lowest validation loss, up to
  `GRID_EXTENSIONS` times (a rate chosen at an edge of what was tried is
  flagged in the results)."""
  rates = [base[method.lr] * g for g in method.grid]
  for _ in range(GRID_EXTENSIONS):
    found = [_find(task_runs, name, lr, 0) for lr in rates]
    if len(rates) < 2 or any(r is None for r in found):
      break
    best = min(range(len(rates)), key=lambda i: found[i]['val_loss'])
    if best == 0:
      rates.insert(0, rates[0] * rates[0] / rates[1])
    elif best == len(rates) - 1:
      rates.append(rates[-1] * rates[-1] / rates[-2])
    else:
      break
  return rates


def chosen_lr(task_runs, name: str, base: dict[str, float], method: Method, chosen: dict) -> float | None:
  """The tried learning rate with the lowest validation loss at seed 0."""
  if method.lr_from:
    return chosen.get(method.lr_from)
  found = [_find(task_runs, name, lr, 0) for lr in grid_rates(task_runs, name, base, method)]
  if any(r is None for r in found):
    return None
  return min(found, key=lambda r: r['val_loss'])['lr']


def summarize(task_runs, base: dict[str, float], methods: dict[str, Method], seeds) -> list[dict[str, Any]]:
  chosen, rows = {}, {}
  for name, method in methods.items():
    lr = chosen_lr(task_runs, name, base, method, chosen)
    if lr is None:
      continue
    runs = [_find(task_runs, name, lr, s) for s in seeds]
    if any(r is None for r in runs):
      continue
    chosen[name] = lr
    test = np.array([r['test_loss'] for r in runs])
    rates = grid_rates(task_runs, name, base, method) if method.grid else []
    grid = {f'{x:.3g}': _find(task_runs, name, x, 0)['val_loss'] for x in rates}
    rows[name] = dict(
        method=name, lr=lr, lr_at_grid_edge=bool(len(rates) > 1 and lr in (rates[0], rates[-1])),
        test_mean=float(test.mean()), test_std=float(test.std(ddof=1)) if len(test) > 1 else 0.0,
        val_mean=float(np.mean([r['val_loss'] for r in runs])),
        state_bytes=runs[0]['state_bytes'], rank=method.rank, reference=method.reference,
        grid_val_loss=grid, step_ms=float(np.median([r['step_ms'] for r in runs])),
    )
    if 'test_accuracy' in runs[0]:
      rows[name]['test_accuracy_mean'] = float(np.mean([r['test_accuracy'] for r in runs]))
  for row in rows.values():
    ref = rows.get(row['reference'])
    row['ratio'] = row['test_mean'] / ref['test_mean'] if ref else None
    row['val_ratio'] = row['val_mean'] / ref['val_mean'] if ref else None
  return list(rows.values())


def planned_runs(methods: dict[str, Method], seeds) -> tuple[int, int]:
  """(runs, compilations) of the protocol for these methods."""
  runs = sum(len(m.grid) + len(seeds) - 1 if m.grid else len(seeds) for m in methods.values())
  compiles = sum(len(seeds) if m.seeded else 1 for m in methods.values())
  return runs, compiles


def _load(path: str) -> dict[str, Any]:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _write(path: str, record: dict[str, Any]) -> None:
  """Writes the JSON through a temporary file, so an interrupt leaves it whole."""
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def run_task(task: Task, methods: dict[str, Method], all_methods: dict[str, Method], seeds,
             stored: dict[str, Any], resume: bool, save: Callable[[], None],
             compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs the protocol for one task's `methods`, storing each run in `stored` as it ends.

  The summary covers every method of `all_methods` with complete stored runs
  of its current spec, so that a partial rerun (--methods) keeps the others.
  """
  specs = {name: m.spec() for name, m in methods.items()}
  if stored.get('config') != task.config:
    if stored.get('runs'):
      print(f'{task.name}: configuration changed, stored runs dropped')
    stored.clear()
  stored.update(config=task.config, base_lr=task.lr)
  stored.setdefault('specs', {})
  stored.setdefault('runs', [])
  for name, spec in specs.items():
    if stored['specs'].get(name) != spec or not resume:
      stored['runs'] = [r for r in stored['runs'] if r['method'] != name]
    stored['specs'][name] = spec

  runner = Runner(task, compiler_options)
  stored['pretrained'] = dict(val_loss=runner.evaluate(runner.params, task.val),
                              test_loss=runner.evaluate(runner.params, task.test))
  n_runs, n_compiles = planned_runs(methods, seeds)
  estimate = n_runs * task.steps * task.pretrain_step_s * 1.3 + n_compiles * 4.0
  print(f'{task.name}: {n_runs} runs of {task.steps} steps, {n_compiles} compilations, '
        f'pretraining step {1e3 * task.pretrain_step_s:.0f} ms: about {estimate / 60:.0f} min '
        '(on an otherwise idle machine)')
  outer = tqdm(total=n_runs, desc=f'{task.name} runs', disable=None)

  def ensure(name, method, lr, seed):
    if _find(stored['runs'], name, lr, seed) is None:
      desc = f'{task.name} {name} lr={lr:.2g} seed={seed}'
      record = runner.run(name, method, lr, seed, desc)
      stored['runs'].append(record)
      save()
      tqdm.write(f"{desc}: val {record['val_loss']:.4f} test {record['test_loss']:.4f} "
                 f"({record['step_ms']:.0f} ms/step)")
    outer.update(1)

  chosen = {}
  for name, method in methods.items():
    while missing := [lr for lr in grid_rates(stored['runs'], name, task.lr, method)
                      if _find(stored['runs'], name, lr, seeds[0]) is None]:
      for lr in missing:
        ensure(name, method, lr, seeds[0])
    lr = chosen_lr(stored['runs'], name, task.lr, method, chosen)
    if lr is None:
      print(f'{task.name} {name}: no learning rate of {method.lr_from} to use; skipped')
      continue
    chosen[name] = lr
    for seed in seeds:
      ensure(name, method, lr, seed)
  outer.close()
  current = {n: m for n, m in all_methods.items() if stored['specs'].get(n) == m.spec()}
  stored['summary'] = summarize(stored['runs'], task.lr, current, seeds)
  save()
  return stored


def print_table(name: str, stored: dict[str, Any]) -> None:
  pre = stored['pretrained']
  print(f"\n{name}: test loss before fine-tuning {pre['test_loss']:.4f}")
  rows = []
  for r in stored['summary']:
    rows.append({
        'method': r['method'], 'lr': f"{r['lr']:.2g}" + (' (edge)' if r['lr_at_grid_edge'] else ''),
        'test loss': f"{r['test_mean']:.4f} ± {r['test_std']:.4f}",
        f'vs ref': f"{r['ratio']:.3f} ({r['reference']})" if r['ratio'] else '',
        'state KiB': f"{r['state_bytes'] / 1024:.1f}",
        'grid val losses': ' '.join(f'{v:.3f}' for v in r['grid_val_loss'].values()),
        **({'test acc': f"{r['test_accuracy_mean']:.3f}"} if 'test_accuracy_mean' in r else {}),
    })
  if rows:
    print(common.table(rows))


# ------------------------------------------------------------------------------ plot
def plot(result: dict[str, Any], path: str) -> None:
  """One panel per task: state bytes (log) against test loss, mean ± std."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  tasks = [t for t in result['tasks'] if result['tasks'][t].get('summary')]
  fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(6.5 * max(len(tasks), 1), 5), squeeze=False)
  names = list(METHODS)
  colors = plt.get_cmap('tab20')(np.linspace(0, 1, 20))
  handles = {}
  for ax, task in zip(axes[0], tasks):
    summary = result['tasks'][task]['summary']
    seen = {}
    for r in summary:
      i = names.index(r['method']) if r['method'] in names else len(names)
      color = colors[(2 * i) % 20 + (2 * i) // 20]
      marker = 's' if 'Lion' in r['method'] else ('D' if r['rank'] is None else 'o')
      # Points of equal state (a variant and its base) are spread 4% sideways,
      # and variants drawn hollow, so that neither hides the other.
      k = seen[r['state_bytes']] = seen.get(r['state_bytes'], -1) + 1
      h = ax.errorbar(r['state_bytes'] * 1.04**k, r['test_mean'], yerr=r['test_std'], fmt=marker,
                      color=color, mfc='none' if '+' in r['method'] else color, mew=1.5,
                      capsize=3, ms=7, label=r['method'])
      handles.setdefault(r['method'], h)
    for r in summary:
      if r['method'] in ('AdamW', 'Lion'):
        ax.axhline(r['test_mean'], color='grey', ls='--' if r['method'] == 'AdamW' else ':', lw=1)
    front = sorted(summary, key=lambda r: (r['state_bytes'], r['test_mean']))
    best, xs, ys = math.inf, [], []
    for r in front:
      if r['test_mean'] < best:
        best = r['test_mean']
        xs.append(r['state_bytes'])
        ys.append(r['test_mean'])
    ax.step(xs, ys, where='post', color='black', alpha=0.25, lw=1)
    ax.set_xscale('log')
    ax.set_xlabel('optimizer state (bytes; equal ones spread 4% apart)')
    ax.set_ylabel('held-out loss (mean ± std over seeds)')
    pre = result['tasks'][task]['pretrained']['test_loss']
    ax.set_title(f'{task} (before fine-tuning: {pre:.3f}); dashed AdamW, dotted Lion', fontsize=10)
    ax.grid(alpha=0.3, which='both')
  fig.legend(list(handles.values()), list(handles), loc='lower center', ncol=4, fontsize=8,
             frameon=False)
  fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(handles) / 4), 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='tiny models, a few steps, one rate, one seed (a smoke test)')
  parser.add_argument('--out', default=None,
                      help='output directory (default: benchmarks/results; a temporary one with --quick)')
  parser.add_argument('--tasks', default=','.join(TASKS), help='comma-separated, of: ' + ','.join(TASKS))
  parser.add_argument('--methods', default=None, help='comma-separated method names (default: all)')
  parser.add_argument('--resume', action='store_true', help='skip the runs already in the results file')
  args = parser.parse_args(argv)

  names = args.methods.split(',') if args.methods else list(METHODS)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    parser.error(f'unknown methods {unknown}; known: {list(METHODS)}')
  all_methods = dict(METHODS)
  if args.quick:
    all_methods = {n: dataclasses.replace(m, grid=(1.0,) if m.grid else ()) for n, m in METHODS.items()}
  methods = {n: m for n, m in all_methods.items() if n in names}
  seeds = SEEDS[:1] if args.quick else SEEDS
  out = args.out or (tempfile.mkdtemp(prefix='quality_') if args.quick else common.RESULTS)
  os.makedirs(out, exist_ok=True)
  tag = 'quick' if args.quick else jax.devices()[0].platform
  path = os.path.join(out, f'quality_{tag}.json')

  result = _load(path)
  result.update(benchmark='quality', device=common.device_name(), jax=jax.__version__,
                seeds=list(seeds), quick=args.quick)
  result.setdefault('tasks', {})
  save = lambda: _write(path, result)
  start = time.perf_counter()
  for name in args.tasks.split(','):
    task = TASKS[name](args.quick)
    stored = result['tasks'].setdefault(name, {})
    run_task(task, methods, all_methods, seeds, stored, args.resume, save,
             QUICK_COMPILER_OPTIONS if args.quick else None)
    print_table(name, stored)
  result['wall_s_last_invocation'] = time.perf_counter() - start
  save()
  png = os.path.join(out, f'quality_{tag}.png')
  plot(result, png)
  print(f'\nwrote {path} and {png} ({(time.perf_counter() - start) / 60:.1f} min)')
  return result


if __name__ == '__main__':
  main()
