"""Writes README's Performance section from the files in benchmarks/results/.

  python benchmarks/report.py     # rewrites the part of README.md between the markers
"""

import glob
import json
import os
import sys

import common

ROOT = os.path.join(os.path.dirname(__file__), '..')
START, END = '<!-- performance:start -->', '<!-- performance:end -->'


def load(pattern):
  """The result records matching `pattern`, each with the name of its file."""
  records = []
  for path in sorted(glob.glob(os.path.join(common.RESULTS, pattern))):
    records.append(dict(json.load(open(path)), file=os.path.basename(path)))
  return records


def section() -> str:
  parts = []
  for r in load('state_memory_*.json'):
    parts += [
        f"**Optimizer state, Llama-2-7B shapes** ({r['params']:.3g} float32 parameters, "
        f"`python benchmarks/state_memory.py`, {r['device']}). MLorc-AdamW's state is "
        f"{r['mlorc_adamw_over_theory']:.4f}x the theoretical 2r(m+n+1) numbers per compressed "
        'matrix plus full moments for vectors.', '',
        common.table(r['rows']), '',
    ]
  for r in load('update_memory_*.json'):
    names = [n for n in ('optax.adamw', 'mlorc.adamw', 'mlorc.adamw +res', 'mlorc.lion', 'galore')
             if f'{n} temp_MiB' in r['rows'][0]]
    parts += [
        f"**Transient memory of the compiled update** (`temp_size_in_bytes`, state donated, "
        f"`python benchmarks/update_memory.py`, {r['device']}): a d=512 transformer with a "
        '4096-token embedding; `x_largest` is the temp over the largest matrix (8 MiB).', '',
        common.table(r['rows'], ['layers', 'params_MiB'] + [f'{n} temp_MiB' for n in names]
                     + [f'{n} x_largest' for n in names]), '',
        'Temp over matrix size, one (d, 4d) matrix:', '', common.table(r['sizes']), '',
    ]
  for r in load('compile_time_*.json'):
    parts += [
        f"**Compile time of the update** (`python benchmarks/compile_time.py`, {r['device']}): an "
        'unrolled d=256 transformer (q, k, v, o, up, down and two norms per layer, each stored '
        'apart), `jax.jit(tx.update).lower(...).compile()`; both optimizers measured side by side '
        'in one run, on a shared machine (absolute seconds are noisy, ratios less so).', '',
        common.table(r['rows'], ['layers', 'optax.adamw compile_s', 'mlorc.adamw compile_s',
                                 'mlorc/optax', 'mlorc vs first depth']), '',
        'First training step of an NNX transformer with `nnx.Optimizer`, compile included:', '',
        common.table(r['nnx_first_step']), '',
    ]
  for r in load('randomized_svd_cost_*.json'):
    parts += [
        f"**The rank-revealing randomized SVD** (`python benchmarks/randomized_svd_cost.py`, "
        f"{r['device']}): share of {r['keys']} random test matrices whose result loses a real "
        'direction (a zero singular value), before (`old`) and after (`new`) this change:', '',
        common.table(r['directions_lost']), '',
        'The second-moment recursion (b2 = 0.999) over 3000 steps, compression error over the '
        'optimal rank-r error:', '',
        common.table(r['recursion']), '',
        'Cost, rank 4, one power iteration (ratios of medians over interleaved rounds):', '',
        common.table(r['rows'], ['shape', 'old_ms', 'new_ms', 'adamw_ms', 'new_over_old',
                                 'new_over_adamw']), '',
        'The same inside the optimizer update:', '',
        common.table(r['in_optimizer']), '',
    ]
  for r in load('update_speed_*.json'):
    parts += [
        f"**Update step time** (median of {r['rounds']} interleaved rounds, "
        f"`python benchmarks/update_speed.py`, {r['device']}): 4 layers, d=512, vocab 4096, "
        'rank 4. Ratios come from one run; the CPU is shared and noisy.', '',
        common.table(r['rows']), '',
        'How the cost grows:', '', common.table(r['scaling']), '',
    ]
  for r in load('train_step_*.json'):
    parts += [
        f"**Full training step**, {r['size']} (`python benchmarks/train_step.py`, {r['device']}):", '',
        common.table(r['rows'], ['optimizer', 'step_ms', 'step_vs_adamw', 'state_MiB', 'peak_MiB',
                                 'peak_vs_adamw', 'compile_s']), '',
    ]
  for r in load('quality_[!q]*.json'):
    parts += [
        f"**Fine-tuning quality** (`python benchmarks/quality.py`, {r['device']}): two tasks, each "
        'pretrained once and fine-tuned from the same weights by every method; learning rate '
        'picked on a grid of 3 on the validation split (seed 0), then seeds 0-2 at that rate; '
        'held-out (test) loss, mean ± std over the 3 seeds; `vs ref` is the ratio of means to '
        "AdamW's (Lion's for the Lion variants); r8/r16 use MLorc-AdamW r4's chosen rate. "
        '`val` is the validation loss at the chosen rate (mean over the seeds; the split the rate '
        'was picked on, so not held out) and `val vs ref` its ratio.', '',
    ]
    for task, stored in r['tasks'].items():
      if not stored.get('summary'):
        continue
      rows = [dict(
          method=x['method'], lr=f"{x['lr']:.2g}" + (' (edge)' if x['lr_at_grid_edge'] else ''),
          test_loss=f"{x['test_mean']:.4f} ± {x['test_std']:.4f}",
          vs_ref=f"{x['ratio']:.3f}" if x['ratio'] else '',
          val=f"{x['val_mean']:.4f}",
          val_vs_ref=f"{x['val_ratio']:.3f}" if x['val_ratio'] else '',
          state_KiB=f"{x['state_bytes'] / 1024:.1f}",
          **({'test_accuracy': f"{x['test_accuracy_mean']:.3f}"} if 'test_accuracy_mean' in x else {}),
      ) for x in stored['summary']]
      parts += [
          f"Task `{task}` (held-out loss before fine-tuning "
          f"{stored['pretrained']['test_loss']:.4f}):", '', common.table(rows), '',
      ]
    parts += [f"![state against held-out loss](benchmarks/results/{r['file'][:-len('.json')]}.png)", '']
  for r in load('residual_study_*.json'):
    c = r['config']
    parts += [
        f"**Residual correction and Lion variants** (`python benchmarks/residual_study.py`, "
        f"{r['device']}): the main job's task (d={c['d']}, {c['finetune_steps']} fine-tuning "
        f"steps), one seed, AdamW-like at lr {c['adamw_lr']:g}, Lion-like at {c['lion_lr']:g}; "
        '`vs full` is the ratio to AdamW or Lion:', '',
        common.table(r['rows']), '',
    ]
  for r in load('finetune_lm_[!q]*.json'):
    c = r['config']
    parts += [
        f"**Fine-tuning** (`python examples/finetune_lm.py`, {r['device']}): char transformer "
        f"d={c['d']}, {c['layers']} layers, pretrained {c['pretrain_steps']} steps on the Python "
        f"language reference, fine-tuned {c['finetune_steps']} steps on stdlib docstrings; "
        f"held-out loss before fine-tuning {r['held_out_before']:.4f}.", '',
        common.table(r['rows']), '',
        f"![fine-tuning loss curves](benchmarks/results/{r['file'][:-len('.json')]}.png)", '',
    ]
  for r in load('finetune_family_[!q]*.json'):
    parts += [
        f"**The rest of the family, fine-tuned** (`python examples/finetune_lm.py --family`, "
        f"{r['device']}): the same model and data, each MLorc optimizer at rank 4 beside its "
        'full-state version (MoFaSGD has none), one seed, learning rates not tuned.', '',
        common.table(r['rows']), '',
    ]
  return '\n'.join(parts).strip()


def main():
  path = os.path.join(ROOT, 'README.md')
  text = open(path).read()
  head, rest = text.split(START)
  _, tail = rest.split(END)
  open(path, 'w').write(f'{head}{START}\n{section()}\n{END}{tail}')
  print('updated', path)


if __name__ == '__main__':
  sys.exit(main())
