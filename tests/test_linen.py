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


class AttentionLayer(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    x = x + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(x))), None


class ScannedTransformer(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, 128)(tokens)
    stack = nn.scan(AttentionLayer, variable_axes={'params': 0}, split_rngs={'params': True}, length=4)
    x, _ = stack()(x, None)
    return nn.Dense(256)(x)


def test_scanned_attention_kernels_are_compressed_per_layer_by_default():
  model = ScannedTransformer()
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  tx = mlorc.adamw(1e-3, rank=4)
  state = jax.eval_shape(
      lambda p: train_state.TrainState.create(apply_fn=model.apply, params=p, tx=tx), params)
  mu = state.opt_state[0].inner_state.mu['ScanAttentionLayer_0']
  attn = mu['MultiHeadDotProductAttention_0']
  for name in ('query', 'key', 'value', 'out'):
    assert attn[name]['kernel'].u.shape == (4, 128, 4), name  # (layers, d, rank)
    assert attn[name]['kernel'].v.shape == (4, 128, 4), name
  assert attn['query']['bias'].shape == (4, 4, 32)  # stacked biases keep full moments
  assert mu['LayerNorm_0']['scale'].shape == (4, 128)
  # The (4, 128, 512) MLP kernel of 4 layers, with 512 = 4 * 128, is still
  # compressed per layer (no (512, 4, 128) query kernel makes it attention).
  assert mu['Dense_1']['kernel'].u.shape == (4, 128, 4)
  assert mu['Dense_1']['kernel'].v.shape == (4, 512, 4)

  summary = mlorc.summarize(tx, params, print_table=False)
  views = {p.path: p.view for p in summary.parameters}
  assert views['ScanAttentionLayer_0/MultiHeadDotProductAttention_0/out/kernel'] == mlorc.MatrixView((1, 2), 3)
  assert summary.fraction < 0.1
