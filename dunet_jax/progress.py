"""Progress bars with an ETA for long passes (evaluation, W fitting, the upper bound).

Only process 0 draws one (every process runs the same pass), on stderr, and only once the work
has lasted `DELAY_SECONDS`: short passes (tests, the demo's small splits) print nothing.
"""
from collections.abc import Iterable
from typing import TypeVar

import jax
from tqdm import tqdm

DELAY_SECONDS = 5.0
T = TypeVar('T')


def bar(total: int | None, description: str, unit: str) -> tqdm:
  """A manually updated bar (`with bar(...) as progress: progress.update(n)`)."""
  return tqdm(total=total, desc=description, unit=unit, delay=DELAY_SECONDS, dynamic_ncols=True,
              disable=jax.process_index() != 0)


def iterate(items: Iterable[T], total: int | None, description: str, unit: str) -> Iterable[T]:
  """`items`, with a bar that advances by one per item."""
  return tqdm(items, total=total, desc=description, unit=unit, delay=DELAY_SECONDS, dynamic_ncols=True,
              disable=jax.process_index() != 0)
