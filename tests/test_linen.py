"""Flax Linen: a TrainState with MLorc-Lion over nn.scan layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import mlorc_optax as mlorc


class Layer(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + nn.tanh(nn.Dense(x.shape[-1])(x)), None


class Scanned(nn.Module):
  layers: int = 4

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Layer, variable_axes={'params': 0}, split_rngs={'params': True}, length=self.layers)
    x, _ = stack()(x, None)
    return nn.Dense(1)(x)


def test_train_state_with_scanned_layers():
  model = Scanned()
  x = jax.random.normal(jax.random.key(0), (64, 32))
  y = jnp.sum(jnp.sin(x), axis=-1, keepdims=True)
  params = model.init(jax.random.key(1), x)['params']
  tx = mlorc.lion(3e-3, rank=2, min_dim_size=16)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  mu = state.opt_state[0].inner_state.mu['ScanLayer_0']['Dense_0']
  assert mu['kernel'].u.shape == (4, 32, 2)  # (layers, m, rank): compressed per layer
  assert mu['bias'].shape == (4, 32)  # the stacked bias keeps its full moment

  @jax.jit
  def step(state):
    loss_fn = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(150):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0]
