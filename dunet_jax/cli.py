"""How every `python -m dunet_jax.<tool>` starts, parses its command line and ends.

A tool module imports this module first, defines `define_flags(options)` (its flags, on the
FlagValues it is handed, so importing any number of tools into one process defines nothing
globally and nothing collides) and `main(options)`, and ends with

  if __name__ == '__main__':
    cli.run(main, define_flags, config='file', join=True)

`run` parses the flags (`--config` through ml_collections, the same way for every tool), applies
dunet_jax.cpu_flags before jax starts its backends, hides GPUs from TensorFlow (tf.data only; the
accelerators belong to jax), joins a multi-process job when the tool runs on all of them, keeps
library chatter out of the output, and turns a user error (a bad flag, a misspelt config key, a
missing file, an invalid setting) into one message and exit status 1. DUNET_JAX_TRACEBACK=1 shows
the traceback instead.

Chatter is filtered where it is written: TensorFlow and absl's C++ logging ignore
TF_CPP_MIN_LOG_LEVEL for some messages, so when the program is a dunet_jax tool, importing this
module routes file descriptor 2 through a small filter process that drops the known
informational lines (CHATTER_LINES) and passes everything else at once; a separate process still
forwards what a crashing program wrote last.
"""
import logging as std_logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from absl import logging

from dunet_jax import cpu_flags

TRACEBACK_ENV = 'DUNET_JAX_TRACEBACK'

# Exceptions that mean the user's input, settings or installation are wrong: one message, no
# traceback (ModuleNotFoundError: an optional package a tool names, e.g. libtpu or torch).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, FloatingPointError,
               ModuleNotFoundError, flags.Error)

# C++ log lines of TensorFlow / absl that say nothing a user can act on.
CHATTER_LINES = (
    r'^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$',
    r'^[IWE]\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\.',
    r'^[IWE]\d{4} [\d:.]+ +\d+ util\.cc:\d+\] oneDNN supports DT_\w+ only on platforms with AVX-512\.',
    r'^[IWE]\d{4} [\d:.]+ +\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized',
    r'^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$',
    # libtpu describing a topology with no TPU attached (compile_check): it looks for the slice it runs on.
    r'^Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type',
    r'^WARNING: Logging before InitGoogle\(\) is written to STDERR$',
    r"^E\d{4} [\d:.]+ +\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING: "
    r'could not determine TPU worker hostnames',
    r'^=== Source Location Trace: === ?$',
    r'^learning/\w+/tfrc/runtime/libtpu_init_utils\.cc:\d+$',
)

# Python log records of libraries that are not for users: orbax's per-save/restore INFO, its
# warnings about the read-only manager evaluation and prediction use, and jax's backend probing.
_QUIET_INFO_PATHS = ('/orbax/', '/jax/_src/')
_QUIET_WARNINGS = (
    re.compile(r'^CheckpointManagerOptions\.read_only=True, setting '),
    re.compile(r'^Given directory is read only='),
    re.compile(r'^Type handler registry type .* overriding jax\.Array$'),  # checkpoint.py's CPU array writer
)

# Reads the program's stderr on stdin, drops whole lines matching argv[1], passes the rest at
# once; ignores SIGINT/SIGTERM so the program's last words still get through, and ends at EOF.
_FILTER_PROGRAM = r'''
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
chatter = re.compile(sys.argv[1].encode(), re.MULTILINE)
while chunk := os.read(0, 65536):
  lines = chunk.splitlines(keepends=True)
  kept = b''.join(line for line in lines if not (line.endswith(b'\n') and chatter.search(line)))
  if kept:
    os.write(2, kept)
'''


def _started_as_a_tool() -> bool:
  """True when this process is `python -m dunet_jax.<tool>` (not a library user or a test)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return bool(spec and spec.name.startswith('dunet_jax.'))


def filter_stderr() -> None:
  """Routes file descriptor 2 through a filter process that drops CHATTER_LINES (see above)."""
  sys.stderr.flush()
  process = subprocess.Popen([sys.executable, '-S', '-c', _FILTER_PROGRAM, '|'.join(CHATTER_LINES)],
                             stdin=subprocess.PIPE)
  os.dup2(process.stdin.fileno(), 2)
  process.stdin.close()


if _started_as_a_tool():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ INFO and WARNING lines
  if not os.environ.get(TRACEBACK_ENV):
    filter_stderr()


class QuietLibraries(std_logging.Filter):
  """Drops the Python log records of libraries that are not for users (_QUIET_*)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.WARNING:
      return not any(path in record.pathname for path in _QUIET_INFO_PATHS)
    return not ('/orbax/' in record.pathname
                and any(pattern.match(record.getMessage()) for pattern in _QUIET_WARNINGS))


def _program_name() -> str:
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec.name if spec and spec.name.startswith('dunet_jax.') else 'dunet_jax'


def _parse_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line naming the flag; keeps ml_collections' did-you-mean hint, drops pasted tracebacks."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
    error = error.args[0]
  if isinstance(error, KeyError) and isinstance(error.args[0], str):  # a ConfigDict key: "'key'\nDid you mean ..."
    key, *hint = error.args[0].splitlines()
    key = key.strip('\'"')
    names = [arg.split('=', 1)[0] for arg in argv if arg.startswith('--config.')]
    flag = next((name for name in names if key in name.split('.')), '--config')
    return ' '.join([f'{flag}: no such config key {key!r}.', *hint])
  text = str(error).strip()
  if 'Traceback (most recent call last)' in text:  # config_flags pastes the config file's traceback
    head = text.split(': ', 1)[0] if text.startswith('flag --') else '--config'
    text = f'{head}: {text.splitlines()[-1]}'
  elif isinstance(error, OSError):  # a config file that failed to load: the reason is the last line
    text = f'--config: {text.splitlines()[-1].strip()}'
  return ' '.join(line.strip() for line in text.splitlines())


def _config_flag(options: flags.FlagValues, kind: str, argv: Sequence[str]) -> None:
  """--config: a file (required) or overrides of a run's recorded config; sys_argv lets
  ml_collections find the --config.key=value overrides in argv rather than in sys.argv."""
  from ml_collections import config_flags
  if kind == 'file':
    config_flags.DEFINE_config_file(
        'config', None, 'Config file and preset, e.g. configs/voc.py:r50_os16; override any key with '
        '--config.section.key=value.', flag_values=options, lock_config=True, sys_argv=list(argv))
    flags.mark_flag_as_required('config', options)
  elif kind == 'overrides':
    from configs import default
    config_flags.DEFINE_config_dict(
        'config', default.get_config(), 'Overrides of the run\'s recorded config, e.g. '
        '--config.eval.flip=True.', flag_values=options, lock_config=True, sys_argv=list(argv))
  else:
    raise ValueError(f"config={kind!r}: use 'file', 'overrides' or None")


def _define_process_flags(options: flags.FlagValues) -> None:
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process runs '
                      'outside Cloud TPU and SLURM (which are detected automatically).', flag_values=options)
  flags.DEFINE_integer('num_processes', None, 'Number of processes, with --coordinator_address.',
                       flag_values=options)
  flags.DEFINE_integer('process_id', None, 'This process\'s index, with --coordinator_address.',
                       flag_values=options)


def join_processes(options: flags.FlagValues) -> None:
  """Joins a multi-process job: explicit flags, or whatever jax detects (Cloud TPU, SLURM, MPI)."""
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU processes; no effect on TPU/GPU
  if options.coordinator_address or options.num_processes is not None or options.process_id is not None:
    if None in (options.coordinator_address, options.num_processes, options.process_id):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together: pass all '
                       'three, or none on Cloud TPU / SLURM where they are detected.')
    jax.distributed.initialize(options.coordinator_address, options.num_processes, options.process_id)
    return
  from jax._src import xla_bridge  # the check jax.distributed.initialize itself makes
  if jax.distributed.is_initialized() or xla_bridge.backends_are_initialized():
    return  # already joined, or jax already runs in this process (a tool called from Python)
  try:
    jax.distributed.initialize()
  except ValueError:  # no cluster detected: one process
    pass


def _is_help(argv: Sequence[str]) -> bool:
  return any(arg in ('-h', '-?', '--help', '--helpshort', '--helpfull') for arg in argv[1:])


def _logging_flags() -> list[flags.Flag]:
  """absl's logging flags (--verbosity, --logtostderr, ...), shared with the global FLAGS they live in."""
  return list(flags.FLAGS.get_flags_for_module('absl.logging'))


def _help(options: flags.FlagValues, doc: str) -> str:
  """The tool's docstring and its flags (absl's logging flags only named)."""
  sections = [doc.strip(), 'flags:']
  for module in options.flags_by_module_dict():
    if module != 'absl.logging':
      sections.append(options.module_help(module).split('\n', 1)[1])
  sections.append('absl logging flags (--verbosity, --logtostderr, --log_dir, ...) are accepted too.')
  return '\n\n'.join(sections)


def parse(define_flags: Callable[[flags.FlagValues], None] | None, argv: Sequence[str], *,
          config: str | None = None, join: bool = False, doc: str = '') -> flags.FlagValues:
  """The tool's flags parsed from argv; --help prints them and exits 0; bad input exits 1."""
  options = flags.FlagValues()
  if define_flags is not None:
    define_flags(options)
  if config is not None:
    _config_flag(options, config, argv)
  if join:
    _define_process_flags(options)
  for flag in _logging_flags():
    flags.DEFINE_flag(flag, options, module_name='absl.logging')
  if _is_help(argv):
    print(_help(options, doc))
    sys.exit(0)
  try:
    remaining = options(list(argv))
    if config == 'file':
      options.config.keys()  # a config file that failed to load raises only when read
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
    if os.environ.get(TRACEBACK_ENV):
      raise
    sys.exit(f'{_program_name()}: error: {_parse_error_message(error, argv)}\nPass --help to see the flags.')
  if len(remaining) > 1:
    sys.exit(f'{_program_name()}: error: unexpected arguments {" ".join(remaining[1:])}\n'
             'Pass --help to see the flags.')
  flags.FLAGS.mark_as_parsed()
  return options


def _quiet_logging() -> None:
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  if not any(isinstance(existing, QuietLibraries) for existing in handler.filters):
    handler.addFilter(QuietLibraries())
  if flags.FLAGS['verbosity'].using_default_value:
    logging.set_verbosity(logging.INFO)


def _hide_gpus_from_tensorflow() -> None:
  if 'tensorflow' in sys.modules:  # a tool that never imports TensorFlow does not pay for it here
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')


def run(main: Callable[[flags.FlagValues], Any], define_flags: Callable[[flags.FlagValues], None] | None = None,
        *, config: str | None = None, join: bool = False, argv: Sequence[str] | None = None) -> None:
  """Runs a tool: parses argv (sys.argv by default), prepares the process, calls main(options).

  config: 'file' for a required --config=FILE[:PRESET] with --config.key=value overrides,
  'overrides' for --config.key=value overrides of a run's recorded config (read with
  config_flags.get_override_values(options['config'])), None for no --config.
  join: the tool runs on every process of a multi-host job (--coordinator_address, ... or
  detected), as training and evaluation do.
  """
  argv = list(sys.argv if argv is None else argv)
  doc = main.__globals__.get('__doc__') or ''
  options = parse(define_flags, argv, config=config, join=join, doc=doc)
  _quiet_logging()
  cpu_flags.apply()  # before jax creates its backends
  try:
    _hide_gpus_from_tensorflow()
    if join:
      join_processes(options)
    main(options)
  except USER_ERRORS as error:
    if os.environ.get(TRACEBACK_ENV):
      raise
    sys.exit(f'{_program_name()}: error: {error}\n(set {TRACEBACK_ENV}=1 to see the traceback)')
