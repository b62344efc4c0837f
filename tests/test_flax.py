"""MLorc inside a Flax NNX training loop."""

import jax
import optax
import pytest
import jax.numpy as jnp
from flax import nnx

import mlorc_optax as mlorc


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(32, 64, rngs=rngs)
    self.out = nnx.Linear(64, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _fit(model, optimizer, x, y, steps):
  """Mean-squared-error training; returns the losses."""

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer)) for _ in range(steps)]


def test_nnx_optimizer_trains_with_low_rank_state():
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mlorc.adamw(1e-2, rank=2, compress=True), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (128, 32))
  y = jnp.sin(x[:, :8])

  losses = _fit(model, optimizer, x, y, 60)
  assert losses[-1] < 0.3 * losses[0]
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(optimizer.opt_state))
  kernel_u = [l for p, l in leaves if 'hidden' in jax.tree_util.keystr(p) and "'u'" in jax.tree_util.keystr(p)]
  assert kernel_u and kernel_u[0].shape == (32, 2)


class ScannedMLP(nnx.Module):
  """Four residual layers created with nnx.vmap and run with nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(32, 32, rngs=rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
      return x + jnp.tanh(layer(x))

    return forward(x, self.layers)


def test_nnx_scan_layers_are_compressed_one_layer_at_a_time():
  model = ScannedMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mlorc.adamw(3e-3, rank=2, min_dim_size=16), wrt=nnx.Param)
  mu = nnx.state(optimizer.opt_state)[0]['inner_state']['mu']['layers']
  assert mu['kernel']['u'][...].shape == (4, 32, 2)  # (layers, m, rank)
  assert mu['bias'][...].shape == (4, 32)  # stacked biases keep full moments

  x = jax.random.normal(jax.random.key(1), (64, 32))
  y = jnp.sin(x)

  losses = _fit(model, optimizer, x, y, 80)
  assert losses[-1] < 0.3 * losses[0]


class TinyTransformer(nnx.Module):
  """Embedding, attention, Einsum, MLP and head, every kernel 128 wide or more."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(128, 128, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=128, decode=False, rngs=rngs)
    self.q = nnx.Einsum('btd,ndh->btnh', (2, 128, 128), rngs=rngs)  # Gemma's query layout
    self.up = nnx.Linear(128, 256, rngs=rngs)
    self.head = nnx.Linear(256, 128, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(x) + self.q(x).mean(axis=-2)
    return self.head(nnx.gelu(self.up(x)))


def _lm_fit(model, optimizer, steps):
  tokens = jax.random.randint(jax.random.key(3), (16, 12), 0, 128)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      logits = m(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer)) for _ in range(steps)]


def test_attention_kernels_are_compressed_without_a_view():
  model = nnx.eval_shape(lambda: TinyTransformer(nnx.Rngs(0)))  # shapes only
  optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, mlorc.adamw(1e-2, rank=4), wrt=nnx.Param), model)
  summary = mlorc.summarize(optimizer.tx, nnx.state(model, nnx.Param), print_table=False)
  views = {p.path: p.view for p in summary.parameters}
  assert views['attn/query/kernel'] == mlorc.MatrixView(0, (1, 2))
  assert views['attn/out/kernel'] == mlorc.MatrixView((0, 1), 2)
  assert views['embed/embedding'] == mlorc.MatrixView(0, 1)
  assert views['q/kernel'] == mlorc.MatrixView(1, 2)  # by shape: one matrix per head
  assert views['attn/query/bias'] is None
  mu = nnx.state(optimizer.opt_state)[0]['inner_state']['mu']
  assert mu['attn']['query']['kernel']['u'].get_value().shape == (128, 4)


class EinsumLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(128, 128, rngs=rngs)
    self.q = nnx.Einsum('btd,ndh->btnh', (2, 128, 128), rngs=rngs)
    self.head = nnx.Linear(128, 128, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    return self.head(x + nnx.gelu(self.q(x)).mean(axis=-2))


def test_nnx_views_train_through_nnx_optimizer():
  model = EinsumLM(nnx.Rngs(0))
  views = mlorc.nnx_views(model)
  optimizer = nnx.Optimizer(model, mlorc.adamw(1e-2, rank=4, compress=views), wrt=nnx.Param)
  summary = mlorc.summarize(optimizer.tx, nnx.state(model, nnx.Param), compress=views,
                            print_table=False)
  # Read from the layer, the Einsum query is features x (heads, head_dim).
  assert {p.path: p.view for p in summary.parameters}['q/kernel'] == mlorc.MatrixView(1, (0, 2))
  mu = nnx.state(optimizer.opt_state)[0]['inner_state']['mu']
  assert mu['q']['kernel']['u'][...].shape == (128, 4)
  assert mu['q']['kernel']['v'][...].shape == (256, 4)

  losses = _lm_fit(model, optimizer, 15)
  assert losses[-1] < 0.7 * losses[0]
