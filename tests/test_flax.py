"""MLorc inside a Flax NNX training loop."""

import jax
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
