"""Shared pieces of the benchmarks: model shapes, timing, result files and tables."""

import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), 'results')


def transformer_shapes(layers: int, d: int, vocab: int, mlp: int | None = None) -> dict[str, Any]:
  """Parameter shapes of a GPT-style transformer (Flax Dense layouts)."""
  mlp = mlp or 4 * d
  block = {
      'attn_qkv': (d, 3 * d), 'attn_out': (d, d), 'mlp_up': (d, mlp), 'mlp_down': (mlp, d),
      'ln1_scale': (d,), 'ln2_scale': (d,), 'mlp_up_bias': (mlp,), 'mlp_down_bias': (d,),
  }
  shapes = {f'layer{i}': dict(block) for i in range(layers)}
  shapes['embed'] = (vocab, d)
  shapes['final_ln'] = (d,)
  return shapes


def llama2_7b_shapes() -> dict[str, Any]:
  """Parameter shapes of Llama-2-7B (32 layers, d=4096, MLP 11008, vocab 32000)."""
  d, mlp = 4096, 11008
  block = {
      'q': (d, d), 'k': (d, d), 'v': (d, d), 'o': (d, d),
      'gate': (d, mlp), 'up': (d, mlp), 'down': (mlp, d),
      'input_norm': (d,), 'post_attn_norm': (d,),
  }
  shapes = {f'layer{i}': dict(block) for i in range(32)}
  shapes.update(embed=(32000, d), lm_head=(d, 32000), final_norm=(d,))
  return shapes


def as_structs(shapes, dtype=jnp.float32):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))


def as_arrays(shapes, seed=0, dtype=jnp.float32):
  structs = as_structs(shapes, dtype)
  leaves, treedef = jax.tree.flatten(structs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.02 * jax.random.normal(k, s.shape, dtype) for k, s in zip(keys, leaves)])


def tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def compiled_update(tx, params):
  """The update compiled as in a train step: state and params donated."""
  state = jax.eval_shape(tx.init, params)
  return jax.jit(tx.update, donate_argnums=(1,)).lower(params, state, params).compile()


def update_temp_bytes(tx, params) -> int:
  return int(compiled_update(tx, params).memory_analysis().temp_size_in_bytes)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
  """Median seconds of fn(), which must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def device_name() -> str:
  d = jax.devices()[0]
  return f'{d.platform}:{d.device_kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'


def save(name: str, rows: list[dict[str, Any]], **meta) -> str:
  os.makedirs(RESULTS, exist_ok=True)
  tag = jax.devices()[0].platform
  path = os.path.join(RESULTS, f'{name}_{tag}.json')
  record = dict(benchmark=name, device=device_name(), jax=jax.__version__, rows=rows, **meta)
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  return path


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
  """A Markdown table of rows (dicts); floats printed with 4 significant digits."""
  columns = columns or list(rows[0])
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)
