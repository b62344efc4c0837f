"""Views of Flax kernels as matrices: the default shape rule, the NNX reader, errors, the report."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlorc_optax as mlorc
from mlorc_optax._src import matrix_view as mv

V = mlorc.MatrixView
D, HEADS, MLP, VOCAB = 128, 4, 512, 256


def views_by_path(params, compress=None, rank=4, min_dim_size=None):
  """{path: view} of the leaves, as resolve_views gives them."""
  views = mlorc.resolve_views(params, compress, rank, min_dim_size)
  paths = [mv.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  leaves = jax.tree.structure(params).flatten_up_to(views)
  return dict(zip(paths, leaves))


# ------------------------------------------------------------------ NNX models
class Block(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
    self.up = nnx.Linear(D, MLP, rngs=rngs)
    self.down = nnx.Linear(MLP, D, rngs=rngs)


class Model(nnx.Module):
  """Every layer kind of the issue, unrolled."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.merge = nnx.LinearGeneral((HEADS, D // HEADS), D, axis=(-2, -1), rngs=rngs)
    self.mix = nnx.Einsum('btd,df->btf', (D, 2 * D), rngs=rngs)
    self.q_einsum = nnx.Einsum('btd,ndh->btnh', (HEADS, D, 64), rngs=rngs)  # Gemma's layout
    self.conv = nnx.Conv(64, D, (3, 3), rngs=rngs)
    self.conv1d = nnx.Conv(64, D, 3, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)


class Scanned(nnx.Module):
  """Four blocks stacked with nnx.vmap: every parameter gets a leading (4,) axis."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = create(rngs)


HUMAN_UNROLLED = {
    'embed/embedding': V(0, 1),
    'blocks/0/attn/query/kernel': V(0, (1, 2)),  # (embed, heads, head_dim)
    'blocks/0/attn/key/kernel': V(0, (1, 2)),
    'blocks/0/attn/value/kernel': V(0, (1, 2)),
    'blocks/0/attn/out/kernel': V((0, 1), 2),  # (heads, head_dim, embed)
    'blocks/0/up/kernel': V(0, 1),
    'blocks/0/down/kernel': V(0, 1),
    'blocks/1/attn/query/kernel': V(0, (1, 2)),
    'blocks/1/attn/out/kernel': V((0, 1), 2),
    'merge/kernel': V((0, 1), 2),  # LinearGeneral from (heads, head_dim)
    'mix/kernel': V(0, 1),
    'conv/kernel': V((0, 1, 2), 3),  # (kh, kw, in, out)
    'head/kernel': V(0, 1),
}
FULL_UNROLLED = (
    'blocks/0/attn/query/bias', 'blocks/0/attn/out/bias', 'blocks/0/norm/scale',
    'blocks/0/norm/bias', 'blocks/0/up/bias', 'merge/bias', 'conv/bias', 'head/bias',
)


@pytest.fixture(scope='module')
def nnx_model():
  return nnx.eval_shape(lambda: Model(nnx.Rngs(0)))  # shapes only: nothing allocated


@pytest.fixture(scope='module')
def nnx_params(nnx_model):
  return nnx.state(nnx_model, nnx.Param)


def test_default_views_of_an_unrolled_nnx_model(nnx_params):
  views = views_by_path(nnx_params)
  for path, view in HUMAN_UNROLLED.items():
    assert views[path] == view, path
  for path in FULL_UNROLLED:
    assert views[path] is None, path
  # By shape alone these are ambiguous; the documented rule takes the leading
  # axis as a batch axis (one matrix per head, per tap).
  assert views['q_einsum/kernel'] == V(1, 2)
  assert views['conv1d/kernel'] == V(1, 2)


def test_nnx_views_read_the_layers(nnx_model, nnx_params):
  views = views_by_path(nnx_params, mlorc.nnx_views(nnx_model))
  for path, view in HUMAN_UNROLLED.items():
    assert views[path] == view, path
  for path in FULL_UNROLLED:
    assert views[path] is None, path
  assert views['q_einsum/kernel'] == V(1, (0, 2))  # features x (heads, head_dim)
  assert views['conv1d/kernel'] == V((0, 1), 2)  # (k, in) x out


def test_default_views_of_a_scanned_nnx_model():
  model = nnx.eval_shape(lambda: Scanned(nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  for views in (views_by_path(params), views_by_path(params, mlorc.nnx_views(model))):
    assert views['embed/embedding'] == V(0, 1)
    assert views['blocks/attn/query/kernel'] == V(1, (2, 3))  # (layers, embed, heads, head_dim)
    assert views['blocks/attn/out/kernel'] == V((1, 2), 3)
    # (4, 128, 512) with 512 = 4 * 128 is not an attention output: no query
    # kernel of shape (512, 4, 128) is in the tree.
    assert views['blocks/up/kernel'] == V(1, 2)
    assert views['blocks/down/kernel'] == V(1, 2)
    for path in ('blocks/attn/query/bias', 'blocks/attn/out/bias', 'blocks/norm/scale',
                 'blocks/up/bias'):
      assert views[path] is None, path


def test_nnx_optimizer_compresses_every_kernel_by_default():
  optimizer = nnx.eval_shape(
      lambda: nnx.Optimizer(Scanned(nnx.Rngs(0)), mlorc.adamw(1e-3, rank=4), wrt=nnx.Param)
  )
  mu = nnx.state(optimizer.opt_state)[0]['inner_state']['mu']
  shape = lambda v: v.get_value().shape
  q = mu['blocks']['attn']['query']['kernel']
  assert shape(q['u']) == (4, D, 4) and shape(q['v']) == (4, D, 4)
  out = mu['blocks']['attn']['out']['kernel']
  assert shape(out['u']) == (4, D, 4) and shape(out['v']) == (4, D, 4)
  assert shape(mu['blocks']['attn']['query']['bias']) == (4, HEADS, D // HEADS)


# ---------------------------------------------------------------- Linen models
class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x))
    return x + nn.Dense(D)(nn.gelu(nn.Dense(MLP)(x))), None


class LinenModel(nn.Module):
  scan: bool

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    x = x + nn.Conv(D, (3,))(x)
    if self.scan:
      stack = nn.scan(LinenBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
      x, _ = stack()(x, None)
    else:
      for _ in range(2):
        x, _ = LinenBlock()(x, None)
    x = nn.DenseGeneral((HEADS, D // HEADS))(x)
    x = nn.DenseGeneral(D, axis=(-2, -1))(x)
    return nn.Dense(VOCAB)(x)


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_default_views_of_linen_models(scan):
  model = LinenModel(scan)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  views = views_by_path(params)
  block = 'ScanLinenBlock_0' if scan else 'LinenBlock_0'
  s = 1 if scan else 0  # the leading layer axis
  shift = lambda view: V(tuple(a + s for a in view.rows), tuple(a + s for a in view.cols))
  assert views['Embed_0/embedding'] == V(0, 1)
  assert views['DenseGeneral_0/kernel'] == V(0, (1, 2))
  assert views['DenseGeneral_1/kernel'] == V((0, 1), 2)
  assert views['Dense_0/kernel'] == V(0, 1)
  attn = f'{block}/MultiHeadDotProductAttention_0'
  for name in ('query', 'key', 'value'):
    assert views[f'{attn}/{name}/kernel'] == shift(V(0, (1, 2)))
    assert views[f'{attn}/{name}/bias'] is None
  assert views[f'{attn}/out/kernel'] == shift(V((0, 1), 2))
  assert views[f'{block}/Dense_0/kernel'] == shift(V(0, 1))
  assert views[f'{block}/Dense_1/kernel'] == shift(V(0, 1))
  for path in (f'{block}/Dense_0/bias', f'{block}/LayerNorm_0/scale', 'Conv_0/bias'):
    assert views[path] is None, path


# ------------------------------------------------------------ the shape rule
@pytest.mark.parametrize('shape, view', [
    ((256, 64), V(0, 1)),  # an embedding with d = 64 is compressed
    ((64, 4096), V(0, 1)),
    ((16, 16, 3, 768), V((0, 1, 2), 3)),  # a patch-embedding Conv with 3 input channels
    ((512, 2, 64), V(0, (1, 2))),  # grouped-query key/value (embed, kv_heads, head_dim)
    ((2, 512, 1024), V(1, 2)),  # Gemma's MLP gating (2, features, hidden)
])
def test_shape_rule(shape, view):
  assert mlorc.default_view(shape, rank=4) == view


@pytest.mark.parametrize('shape', [(32, 128), (6, 512), (4, 8, 64), (3, 3, 3, 16), (256,), ()])
def test_shape_rule_keeps_small_and_stacked_parameters_full(shape):
  assert mlorc.default_view(shape, rank=4) is None


def test_bias_and_scale_are_never_compressed_by_default():
  params = {'layers': {'bias': jnp.zeros((96, 1024)), 'scale': jnp.zeros((96, 1024)),
                       'gamma': jnp.zeros((96, 1024))}}
  views = views_by_path(params)
  assert views['layers/bias'] is None and views['layers/scale'] is None
  assert views['layers/gamma'] == V(0, 1)  # by shape alone: a matrix


def test_default_rule_needs_a_memory_saving():
  assert mlorc.default_view((64, 64), rank=31) == V(0, 1)  # 31 * 129 < 64 * 64
  assert mlorc.default_view((64, 64), rank=32) is None
  assert mlorc.default_view((32, 512), rank=4, min_dim_size=32) == V(0, 1)


# ---------------------------------------------------------------- MatrixView
def test_matrix_view_accepts_ints_and_sequences():
  assert V(0, 1) == V((0,), (1,)) == V(rows=[0], cols=np.array([1]))
  assert V(rows=0, cols=1).rows == (0,)
  params = {'w': jnp.zeros((16, 12))}
  tx = mlorc.scale_by_adam(rank=2, compress={'w': V(rows=0, cols=1)})
  state = jax.eval_shape(tx.init, params)
  assert state.inner_state.mu['w'].u.shape == (16, 2)


@pytest.mark.parametrize('rows, cols', [((), 1), ('a', 1), (True, 1), (0, 1.0), (0, None)])
def test_matrix_view_rejects_non_int_axes(rows, cols):
  with pytest.raises(TypeError, match='MatrixView'):
    V(rows, cols)


@pytest.mark.parametrize('view', [V(0, 5), V(-3, 1), V(2, 0), V(0, -3), V(0, -2)])
def test_axes_out_of_range_or_repeated_are_refused_naming_the_parameter(view):
  params = {'layer': {'w': jnp.zeros((16, 12)), 'b': jnp.zeros(12)}}
  compress = {'layer': {'w': view, 'b': False}}
  with pytest.raises(ValueError, match=r"'layer/w' of shape \(16, 12\)"):
    mlorc.resolve_views(params, compress, rank=2)
  with pytest.raises(ValueError, match="'layer/w'"):
    mlorc.adam(1e-3, rank=2, compress=compress).init(params)


def test_negative_axes_are_normalised():
  params = {'w': jnp.zeros((3, 16, 12))}
  assert views_by_path(params, {'w': V(-2, -1)})['w'] == V(1, 2)
  assert views_by_path(params, {'w': V((-3, -2), -1)})['w'] == V((0, 1), 2)


def test_prefix_trees_and_callables_give_the_same_views():
  params = {'enc': {'w': jnp.zeros((16, 12)), 'b': jnp.zeros(12)},
            'dec': {'w': jnp.zeros((3, 12, 16)), 'b': jnp.zeros((3, 16))}}
  full = {'enc': {'w': True, 'b': True}, 'dec': {'w': True, 'b': False}}
  prefix = {'enc': True, 'dec': {'w': True, 'b': None}}
  by_callable = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, x: mv.path_name(path) != 'dec/b', p)
  expected = {'enc/w': V(0, 1), 'enc/b': None, 'dec/w': V(1, 2), 'dec/b': None}
  for compress in (full, prefix, by_callable):
    assert views_by_path(params, compress, rank=2) == expected


def test_bad_entries_name_the_parameter():
  with pytest.raises(TypeError, match="'enc'"):
    mlorc.resolve_views({'enc': jnp.zeros((4, 4))}, {'enc': 'yes'}, rank=2)


def test_explicit_compression_that_saves_nothing_warns_naming_the_parameter():
  params = {'small': jnp.zeros((8, 6)), 'big': jnp.zeros((64, 64))}
  with pytest.warns(UserWarning, match=r"'small' \(8, 6\) seen as 8x6"):
    views = mlorc.resolve_views(params, {'small': V(0, 1), 'big': True}, rank=4)
  assert views['small'] == V(0, 1)  # compressed as asked


# ---------------------------------------------------------------- the report
def _tree_bytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_summary_bytes_are_the_states():
  params = {'w': jnp.zeros((300, 200)), 'stack': jnp.zeros((3, 128, 96)),
            'b': jnp.zeros(200, jnp.bfloat16)}
  tx = optax.chain(
      optax.clip_by_global_norm(1.0), mlorc.scale_by_adam(rank=4, min_dim_size=64), optax.scale(-1e-3)
  )
  s = mlorc.summarize(tx, params, print_table=False)
  rows = {p.path: p for p in s.parameters}
  assert s.state_bytes == _tree_bytes(jax.eval_shape(tx.init, params))
  assert s.adam_bytes == _tree_bytes(jax.eval_shape(optax.adam(1e-3).init, params))
  assert sum(p.state_bytes for p in s.parameters) + s.other_bytes == s.state_bytes
  assert rows['w'].state_bytes == 2 * 4 * (300 + 200 + 1) * 4  # two moments, float32 factors
  assert rows['w'].adam_bytes == 2 * 300 * 200 * 4
  assert rows['stack'].view == V(1, 2) and rows['stack'].matrix == ((3,), 128, 96)
  assert rows['stack'].state_bytes == 3 * 2 * 4 * (128 + 96 + 1) * 4
  assert rows['b'].view is None and rows['b'].state_bytes == 2 * 200 * 2
  assert s.compressed == 2


def test_summary_of_lion_and_of_full_optimizers():
  params = {'w': jnp.zeros((300, 200)), 'b': jnp.zeros(200)}
  lion = mlorc.summarize(mlorc.lion(1e-4, rank=2), params, print_table=False)
  assert lion.parameters[1].state_bytes == 2 * (300 + 200 + 1) * 4  # one momentum
  adamw = mlorc.summarize(optax.adamw(1e-3), params, print_table=False)
  assert adamw.compressed == 0 and adamw.fraction == pytest.approx(1.0)


def test_summary_names_explicit_views_and_prints(capsys):
  params = {'qkv': jnp.zeros((128, 4, 32)), 'conv': jnp.zeros((3, 3, 16, 64))}
  compress = {'qkv': V(0, (1, 2)), 'conv': V((0, 1, 2), 3)}
  s = mlorc.summarize(mlorc.adam(1e-3, rank=2, compress=compress), params)
  assert [p.view for p in s.parameters] == [V((0, 1, 2), 3), V(0, (1, 2))]
  text = capsys.readouterr().out
  assert 'qkv' in text and '128x128' in text and '144x64' in text
  assert 'of optax.adam' in text


def test_summary_of_nnx_variables_matches_plain_arrays(nnx_params):
  tx = mlorc.adamw(1e-3, rank=4, min_dim_size=64)
  boxed = mlorc.summarize(tx, nnx_params, print_table=False)
  plain = mlorc.summarize(tx, jax.tree.map(lambda x: x, nnx.to_pure_dict(nnx_params)), print_table=False)
  assert boxed == plain
  assert {p.path: p.view for p in boxed.parameters if p.view is not None} == {
      **HUMAN_UNROLLED, 'q_einsum/kernel': V(1, 2), 'conv1d/kernel': V(1, 2),
      'blocks/1/attn/key/kernel': V(0, (1, 2)), 'blocks/1/attn/value/kernel': V(0, (1, 2)),
      'blocks/1/up/kernel': V(0, 1), 'blocks/1/down/kernel': V(0, 1),
  }


class Transformer(nnx.Module):

  def __init__(self, d, heads, layers, vocab, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([_Block(d, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)


class _Block(nnx.Module):

  def __init__(self, d, heads, rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)


@pytest.mark.parametrize('vocab', [256, 32000])
def test_state_of_a_d512_transformer_is_under_8_percent_of_adamw(vocab):
  model = nnx.eval_shape(lambda: Transformer(512, 8, 4, vocab, nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  s = mlorc.summarize(mlorc.adamw(1e-3, rank=4), params, print_table=False)
  adamw = _tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, nnx.to_pure_dict(params)))
  assert s.state_bytes / adamw <= 0.08
  kernels = [p for p in s.parameters if p.path.endswith(('kernel', 'embedding'))]
  assert all(p.view is not None for p in kernels)
