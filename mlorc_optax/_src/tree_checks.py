"""Errors for trees that do not match, naming the first parameter path that differs."""

from typing import Any

import jax

KeyPath = tuple[Any, ...]


def leaf_paths(tree: Any) -> list[KeyPath]:
  """Key paths of a tree's leaves, in flattening order."""
  return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def first_difference(reference: Any, other: Any) -> str | None:
  """A sentence naming the first path where `other` differs from `reference`
  (whose leaves may stand for whole subtrees of `other`), or None."""
  ref_paths = leaf_paths(reference)
  other_paths = leaf_paths(other)
  covers = lambda a, b: b[:len(a)] == a  # a is a prefix of b
  for a in ref_paths:
    if not any(covers(a, b) for b in other_paths):
      return f'the updates have an entry at {jax.tree_util.keystr(a)}, {{what}} has none'
  for b in other_paths:
    if not any(covers(a, b) for a in ref_paths):
      return f'{{what}} has an entry at {jax.tree_util.keystr(b)} that the updates lack'
  return None


def check_matches(updates: Any, other: Any, what: str, fix: str) -> None:
  """Raises a ValueError naming the first differing path if `other` (a
  parameter-shaped tree of the state, or the parameters) does not hold an
  entry for every leaf of `updates` and nothing else."""
  try:
    jax.tree.structure(updates).flatten_up_to(other)
    return
  except (ValueError, TypeError, KeyError):
    pass
  where = (first_difference(updates, other) or '{what} has another tree structure').format(what=what)
  raise ValueError(f'`updates` do not match {what}: {where}. {fix}')
