"""The published MLorc-AdamW algorithm in PyTorch, as a speed reference.

Written by us from the paper (arXiv 2506.01897): per matrix, reconstruct both
moments, repair the second, update, and recompress each with
``torch.pca_lowrank(q=rank, center=False, niter=1)``. Optional: needs torch.
"""

import importlib.util
import time

import numpy as np


def available() -> bool:
  return importlib.util.find_spec('torch') is not None


def _mlorc_adamw_step(p, g, state, step, rank, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4):
  import torch

  if p.ndim != 2:
    m, v = state
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
  else:
    (um, sm, vm), (uv, sv, vv) = state
    m = b1 * (um * sm) @ vm.T + (1 - b1) * g
    v_rec = (uv * sv) @ vv.T
    neg = v_rec < 0
    fill = (-v_rec[neg]).mean() if bool(neg.any()) else v_rec.new_zeros(())
    v = b2 * torch.where(neg, fill, v_rec) + (1 - b2) * g * g
  update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
  p.add_(update + wd * p, alpha=-lr)
  if p.ndim == 2:
    state[0] = torch.pca_lowrank(m, q=rank, center=False, niter=1)
    state[1] = torch.pca_lowrank(v, q=rank, center=False, niter=1)


def time_mlorc_adamw(shapes, rank, rounds) -> float:
  """Median seconds of one MLorc-AdamW step over parameters of `shapes`."""
  import torch

  flat = [s for layer in shapes.values() for s in (layer.values() if isinstance(layer, dict) else [layer])]
  params = [0.02 * torch.randn(s) for s in flat]
  grads = [torch.randn(s) for s in flat]

  def init(p):
    if p.ndim != 2:
      return [torch.zeros_like(p), torch.zeros_like(p)]
    m, n = p.shape
    zero = lambda: (torch.zeros(m, rank), torch.zeros(rank), torch.zeros(n, rank))
    return [zero(), zero()]

  states = [init(p) for p in params]
  times = []
  with torch.no_grad():
    for step in range(1, rounds + 3):
      start = time.perf_counter()
      for p, g, s in zip(params, grads, states):
        _mlorc_adamw_step(p, g, s, step, rank)
      times.append(time.perf_counter() - start)
  return float(np.median(times[2:]))
