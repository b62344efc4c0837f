"""A full training step (forward, backward, update) of a GPT-2-small-sized model.

Compares optax.adamw with mlorc.adamw (rank 4): median step time, the
optimizer-state bytes, and peak device memory. Each optimizer runs in its own
process so that the device's peak-memory counter belongs to it alone. On a
CPU the peak is the compiled step's argument + output + temp bytes (XLA's
memory analysis); on a GPU it is the device's peak_bytes_in_use.

  python benchmarks/train_step.py                 # GPT-2 small: 12 layers, d=768, vocab 50257
  python benchmarks/train_step.py --size tiny     # a smoke run
"""

import argparse
import json
import subprocess
import sys
import time

SIZES = {
    'gpt2-small': dict(layers=12, d=768, heads=12, vocab=50257, seq=512, batch=8),
    'tiny': dict(layers=2, d=128, heads=4, vocab=1024, seq=64, batch=4),
}


def measure(name: str, size: str, steps: int) -> dict:
  """Runs in the child process: builds the model, trains, reports."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import mlorc_optax as mlorc

  cfg = SIZES[size]
  d, heads = cfg['d'], cfg['heads']

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.norm1, self.norm2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
      self.qkv, self.out = nnx.Linear(d, 3 * d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
      self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
      b, t, _ = x.shape
      q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, t, 3 * heads, d // heads), 3, axis=2)
      attn = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
      x = x + self.out(attn)
      return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  class GPT(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(cfg['vocab'], d, rngs=rngs)
      self.pos = nnx.Param(0.01 * jax.random.normal(rngs.params(), (cfg['seq'], d)))

      @nnx.split_rngs(splits=cfg['layers'])
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def blocks(rngs):
        return Block(rngs)

      self.blocks = blocks(rngs)
      self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.pos[: tokens.shape[1]]

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, block):
        return block(x)

      return self.embed.attend(self.norm(run(x, self.blocks)))

  tx = {'optax.adamw': optax.adamw(3e-4), 'mlorc.adamw': mlorc.adamw(3e-4, rank=4)}[name]
  model = GPT(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  tokens = jax.random.randint(jax.random.key(1), (cfg['batch'], cfg['seq'] + 1), 0, cfg['vocab'])
  start = time.perf_counter()
  jax.block_until_ready(step(model, optimizer, tokens))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(model, optimizer, tokens))
    times.append(time.perf_counter() - start)

  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    peak, how = stats['peak_bytes_in_use'], 'device peak_bytes_in_use'
  else:
    analysis = step.lower(model, optimizer, tokens).compile().memory_analysis()
    peak = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    how = 'compiled argument + output + temp bytes'
  state = nnx.state(optimizer.opt_state)
  return dict(
      optimizer=name, step_ms=1e3 * float(np.median(times)), compile_s=compile_s,
      state_MiB=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20,
      peak_MiB=peak / 2**20, peak_from=how,
      params_M=sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6,
      device=f'{device.platform}:{device.device_kind}',
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--size', choices=sorted(SIZES), default='gpt2-small')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.child, args.size, args.steps)))
    return
  rows = []
  for name in ('optax.adamw', 'mlorc.adamw'):
    out = subprocess.run(
        [sys.executable, __file__, '--child', name, '--size', args.size, '--steps', str(args.steps)],
        capture_output=True, text=True, check=True,
    ).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  base = rows[0]
  for r in rows:
    r['step_vs_adamw'] = r['step_ms'] / base['step_ms']
    r['peak_vs_adamw'] = r['peak_MiB'] / base['peak_MiB']

  import common

  print(f"Training step, {args.size} ({rows[0]['params_M']:.1f}M parameters), on {rows[0]['device']}")
  print(common.table(rows, ['optimizer', 'step_ms', 'step_vs_adamw', 'state_MiB', 'peak_MiB',
                            'peak_vs_adamw', 'compile_s']))
  print('peak memory from:', rows[0]['peak_from'])
  if args.size != 'tiny':
    print('wrote', common.save('train_step', rows, size=args.size, config=SIZES[args.size]))


if __name__ == '__main__':
  main()
