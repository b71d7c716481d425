"""Decisions every process of a multi-process job must share: made once, by process 0.

A value each host computed for itself (does the workdir hold W? which checkpoint step is newest?)
can differ between hosts (local disks, listings that are not yet consistent), and the hosts then
take different paths into the next collective and hang. `chief_decides` runs the decision on
process 0 only and hands its result, or its error, to every process through the jax.distributed
key-value store. The other processes wait for it without a device collective: gloo, the CPU
collectives, gives up on a peer after 30 s, while process 0 may take minutes (building a dataset
from its archives).
"""
import builtins
import collections
import itertools
import json
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp

T = TypeVar('T')

# How long the other processes wait for process 0's decision. A process 0 that dies is reported
# by the coordination service long before this; a slow one (a first TFDS build) is waited for.
WAIT_FOR_CHIEF_MS = 24 * 3600 * 1000


# Every process makes the same calls in the same order, so a per-name counter gives each call the
# same key on every process (the key-value store refuses to overwrite a key).
_calls: collections.defaultdict[str, itertools.count] = collections.defaultdict(itertools.count)


class ChiefFailed(RuntimeError):
  """Process 0 failed while deciding; the message is its error's."""


def _key(name: str) -> str:
  return f'dunet_jax/{name}/{next(_calls[name])}'


def chief_decides(name: str, decide: Callable[[], T]) -> T:
  """`decide()` run on process 0 only; its JSON-able result on every process.

  If it raises, process 0 raises that error and every other process raises an error of the same
  built-in type (e.g. FileNotFoundError, ValueError) with the same message, so each process exits
  with it rather than waiting for process 0 at a barrier.
  """
  if jax.process_count() == 1:
    return decide()
  client = ocp.multihost.get_jax_distributed_client()
  key = _key(name)
  if jax.process_index() == 0:
    try:
      result = decide()
    except Exception as error:
      client.key_value_set(key, json.dumps(describe_error(error)))
      raise
    client.key_value_set(key, json.dumps({'result': result}))
    return result
  reply = json.loads(client.blocking_key_value_get(key, WAIT_FOR_CHIEF_MS))
  if 'error' in reply:
    raise rebuild_error(reply)
  return reply['result']


def describe_error(error: BaseException) -> dict[str, Any]:
  """A JSON-able description of `error` that `rebuild_error` turns back into an exception."""
  return {'error': _builtin_base(type(error)).__name__, 'message': str(error), 'process': jax.process_index()}


def rebuild_error(description: dict[str, Any]) -> Exception:
  """An exception of the described built-in type (ChiefFailed if it is not one) and message,
  naming the process it happened on when that is another one."""
  error_type = getattr(builtins, description['error'], None)
  if not (isinstance(error_type, type) and issubclass(error_type, Exception)):
    error_type = ChiefFailed
  message = description['message']
  if description['process'] != jax.process_index():
    message = f'{message} (on process {description["process"]})'
  return error_type(message)


def chief_first(name: str, run: Callable[[], T]) -> T:
  """`run()` on process 0, then, once it succeeded, on the others (e.g. build a dataset once, then
  open it everywhere); if it fails on process 0, every process raises its error."""
  results = []
  chief_decides(name, lambda: results.append(run()) if jax.process_index() == 0 else None)
  return results[0] if results else run()


def gather(name: str, value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (through the key-value store)."""
  if jax.process_count() == 1:
    return [value]
  client = ocp.multihost.get_jax_distributed_client()
  key = _key(name)
  client.key_value_set(f'{key}/{jax.process_index()}', json.dumps(value))
  return [json.loads(client.blocking_key_value_get(f'{key}/{index}', WAIT_FOR_CHIEF_MS))
          for index in range(jax.process_count())]


def _builtin_base(error_type: type) -> type:
  """The most derived built-in exception class `error_type` is (or derives from)."""
  return next(cls for cls in error_type.__mro__ if getattr(builtins, cls.__name__, None) is cls)
