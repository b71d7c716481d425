"""The launch scripts: --dry-run prints the exact commands, a real run executes exactly those (checked
with stub gcloud / sbatch / srun / nvidia-smi / python that record their arguments), and a missing tool
or placeholder setting fails with one clear message before anything runs."""
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

from helpers import REPO_ROOT

LAUNCH = REPO_ROOT / 'launch'
CONFIG = 'configs/default.py'
BASH = shutil.which('bash')
# What the scripts use besides the tools under test.
TOOLS = ('dirname', 'sed', 'git', 'mkdir', 'sleep', 'cat', 'touch', 'rm')

STUB = """#!{bash}
{{ printf '%s\\037' "${{0##*/}}" "$@"; printf '\\036'; }} >> "$STUB_LOG"
if [ "${{0##*/}}" = python ]; then echo "$XLA_PYTHON_CLIENT_MEM_FRACTION" > "$STUB_LOG.mem_fraction"; fi
"""

pytestmark = pytest.mark.skipif(BASH is None, reason='bash is not installed')


def _tools_dir(tmp_path: pathlib.Path, stubs: tuple[str, ...]) -> pathlib.Path:
  """A PATH directory with the basic tools and a recording stub for each name in `stubs`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for tool in TOOLS:
    if (found := shutil.which(tool)) and not (bin_dir / tool).exists():
      (bin_dir / tool).symlink_to(found)
  for name in stubs:
    _write_stub(bin_dir / name)
  return bin_dir


def _write_stub(path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(STUB.format(bash=BASH))
  path.chmod(0o755)


def _run(script: str, args: list[str], tmp_path: pathlib.Path, env: dict[str, str] | None = None,
         stubs: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
  full_env = {'PATH': str(_tools_dir(tmp_path, stubs)), 'HOME': str(tmp_path / 'home'),
              'TMPDIR': str(tmp_path), 'STUB_LOG': str(tmp_path / 'calls.log'), **(env or {})}
  return subprocess.run([BASH, str(LAUNCH / script), *args], env=full_env, capture_output=True,
                        text=True, timeout=60, check=False)


def _printed_commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def _recorded_calls(tmp_path: pathlib.Path) -> list[list[str]]:
  log = tmp_path / 'calls.log'
  if not log.exists():
    return []
  return [record.split('\x1f')[:-1] for record in log.read_text().split('\x1e') if record]


def _external(commands: list[list[str]]) -> list[list[str]]:
  """Printed commands that start a program (not cd / export / module), program name reduced to basename
  (and without a leading `exec`, which runs the program in place of the shell)."""
  commands = [c[1:] if c[0] == 'exec' else c for c in commands]
  return [[os.path.basename(c[0]), *c[1:]] for c in commands if c[0] not in ('cd', 'export', 'module')]


def _main_command(python: str, workdir: str, *extra: str) -> list[str]:
  return [python, '-m', 'dunet_jax.main', f'--config={CONFIG}', f'--workdir={workdir}', *extra]


TPU_ENV = {'TPU_NAME': 'my-tpu', 'ZONE': 'europe-west4-a', 'ACCELERATOR_TYPE': 'v5p-16',
           'TPU_VERSION': 'v2-alpha-tpuv5', 'PROJECT': 'my-project'}
TPU_ARGS = [f'--config={CONFIG}', '--workdir=gs://bucket/run 1', '--config.train.batch_size=32']


def test_tpu_dry_run_prints_every_command(tmp_path):
  result = _run('tpu_vm.sh', ['--dry-run', *TPU_ARGS], tmp_path, TPU_ENV)
  assert result.returncode == 0, result.stderr
  commands = _printed_commands(result.stdout)
  location = ['--zone=europe-west4-a', '--project=my-project']
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'my-tpu', *location,
                         '--format=value(state)']
  assert commands[1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', *location,
                         '--accelerator-type=v5p-16', '--version=v2-alpha-tpuv5']
  scp = next(c for c in commands if c[4] == 'scp')
  assert '--worker=all' in scp
  ssh = [c for c in commands if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert all(c[5] == 'my-tpu' and '--worker=all' in c for c in ssh)
  remote = [c[-1].removeprefix('--command=') for c in ssh]
  assert '"jax[tpu]==0.10.2"' in remote[-2] and '-r dunet_jax/requirements.txt' in remote[-2]
  assert shlex.split(remote[-1]) == [
    'cd', 'dunet_jax', '&&', *_main_command('~/dunet_venv/bin/python', 'gs://bucket/run 1',
                                            '--config.train.batch_size=32')]
  assert not (tmp_path / 'calls.log').exists()


def test_tpu_options_spot_clone_and_background(tmp_path):
  env = {**TPU_ENV, 'SPOT': '1', 'REPO_URL': 'https://example.com/dunet.git', 'REPO_REF': 'v1',
         'BACKGROUND': '1'}
  result = _run('tpu_vm.sh', ['--dry-run', *TPU_ARGS], tmp_path, env)
  assert result.returncode == 0, result.stderr
  commands = _printed_commands(result.stdout)
  assert commands[1][-1] == '--spot'
  assert not any(c[4] == 'scp' for c in commands)
  clone = commands[2][-1]
  assert 'git clone --quiet https://example.com/dunet.git dunet_jax' in clone and 'origin v1' in clone
  train = commands[-1][-1]
  assert train.startswith('--command=cd dunet_jax && nohup ')
  assert train.endswith('> ~/dunet_train.log 2>&1 < /dev/null &')


def test_tpu_real_run_executes_what_dry_run_prints(tmp_path):
  dry = _run('tpu_vm.sh', ['--dry-run', *TPU_ARGS], tmp_path, TPU_ENV)
  real = _run('tpu_vm.sh', TPU_ARGS, tmp_path, TPU_ENV, stubs=('gcloud',))
  assert real.returncode == 0, real.stderr
  # The stub's describe prints no state: the TPU counts as missing and is created, as dry-run shows.
  assert _recorded_calls(tmp_path) == [c for c in _external(_printed_commands(dry.stdout)) if c[0] != 'git']
  assert (tmp_path / 'dunet_jax_code.tar.gz').stat().st_size > 0  # git archive of HEAD really ran


def test_tpu_fails_clearly_without_gcloud_or_with_the_placeholder_workdir(tmp_path):
  result = _run('tpu_vm.sh', [f'--config={CONFIG}', '--workdir=gs://bucket/run'], tmp_path)
  assert result.returncode != 0
  assert "'gcloud' not found" in result.stderr and 'Google Cloud CLI' in result.stderr
  assert '+ ' not in result.stdout
  result = _run('tpu_vm.sh', [f'--config={CONFIG}'], tmp_path, stubs=('gcloud',))
  assert result.returncode != 0 and 'placeholder' in result.stderr
  assert _recorded_calls(tmp_path) == []


def test_missing_config_file_is_an_error(tmp_path):
  result = _run('tpu_vm.sh', ['--config=configs/nope.py', '--workdir=gs://b/r'], tmp_path, stubs=('gcloud',))
  assert result.returncode != 0 and "config file 'configs/nope.py'" in result.stderr
  assert _recorded_calls(tmp_path) == []


GPU_ARGS = [f'--config={CONFIG}', '--workdir=/data/runs/a', '--config.train.num_steps=10']


def test_gpu_single_host_dry_run_and_real_run(tmp_path):
  venv = tmp_path / 'venv'
  env = {'VENV_DIR': str(venv), 'GPUS': '0,1', 'JAX_EXTRA': 'cuda13', 'MEM_FRACTION': '0.8'}
  dry = _run('gpu_single_host.sh', ['--dry-run', *GPU_ARGS], tmp_path, env)
  assert dry.returncode == 0, dry.stderr
  commands = _printed_commands(dry.stdout)
  assert commands[0] == ['nvidia-smi', '--list-gpus']
  assert commands[1] == ['python3.11', '-m', 'venv', str(venv)]
  assert commands[2] == [f'{venv}/bin/python', '-m', 'pip', 'install', '--quiet', '-r',
                         f'{REPO_ROOT}/requirements.txt', 'jax[cuda13]==0.10.2']
  assert ['export', 'CUDA_VISIBLE_DEVICES=0,1'] in commands
  assert ['export', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.8'] in commands
  # exec: a SIGTERM sent to the script reaches training (which saves and exits), not just the shell.
  assert commands[-1] == ['exec', *_main_command(f'{venv}/bin/python', '/data/runs/a', '--config.train.num_steps=10')]

  _write_stub(venv / 'bin' / 'python')
  real = _run('gpu_single_host.sh', GPU_ARGS, tmp_path, env, stubs=('nvidia-smi', 'python3.11'))
  assert real.returncode == 0, real.stderr
  assert _recorded_calls(tmp_path) == _external(commands)
  assert (tmp_path / 'calls.log.mem_fraction').read_text().strip() == '0.8'


def test_gpu_single_host_fails_clearly_without_nvidia_smi(tmp_path):
  result = _run('gpu_single_host.sh', GPU_ARGS, tmp_path)
  assert result.returncode != 0 and "'nvidia-smi' not found" in result.stderr
  assert '+ ' not in result.stdout


SLURM_ENV = {'NODES': '4', 'GPUS_PER_NODE': '8', 'PARTITION': 'gpu', 'TIME_LIMIT': '2:00:00'}
SLURM_ARGS = [f'--config={CONFIG}', '--workdir=/shared/runs/a', '--config.train.batch_size=64']


def test_slurm_dry_run_prints_sbatch_and_srun(tmp_path):
  result = _run('slurm_multinode.sh', ['--dry-run', *SLURM_ARGS], tmp_path, SLURM_ENV)
  assert result.returncode == 0, result.stderr
  commands = _printed_commands(result.stdout)
  sbatch = next(c for c in commands if c[0] == 'sbatch')
  for option in ('--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=gpu',
                 '--time=2:00:00', '--signal=TERM@180', '--requeue', f'--chdir={REPO_ROOT}'):
    assert option in sbatch
  script = sbatch.index(f'{REPO_ROOT}/launch/slurm_multinode.sh')
  assert sbatch[script + 1:] == ['--inside-job', *SLURM_ARGS]
  srun = commands[-2]
  python = f'{tmp_path}/home/.venvs/dunet_jax_gpu/bin/python'
  assert srun == ['srun', '--kill-on-bad-exit=1', '--gpu-bind=none',
                  *_main_command(python, '/shared/runs/a', '--config.train.batch_size=64')]
  assert commands[-1] == ['scontrol', 'requeue', '$SLURM_JOB_ID']  # only after a preemption (exit 75)
  assert 'status 75' in result.stdout.splitlines()[-2]


def test_slurm_submit_and_job_run_what_dry_run_prints(tmp_path):
  dry = _run('slurm_multinode.sh', ['--dry-run', *SLURM_ARGS], tmp_path, SLURM_ENV)
  submit, job = dry.stdout.split('# then, inside the job')
  real = _run('slurm_multinode.sh', SLURM_ARGS, tmp_path, SLURM_ENV, stubs=('sbatch',))
  assert real.returncode == 0, real.stderr
  calls = _recorded_calls(tmp_path)
  assert calls == [c for c in _external(_printed_commands(submit)) if c[0] != 'mkdir']
  assert (tmp_path / 'home' / 'dunet_runs' / 'slurm_logs').is_dir()
  (tmp_path / 'calls.log').unlink()
  inside = calls[0][calls[0].index('--inside-job'):]  # what sbatch would run the script with
  real = _run('slurm_multinode.sh', inside, tmp_path, SLURM_ENV, stubs=('srun', 'scontrol'))
  assert real.returncode == 0, real.stderr
  # Training finished (srun exited 0): the job is not requeued.
  assert _recorded_calls(tmp_path) == [c for c in _external(_printed_commands(job)) if c[0] != 'scontrol']


def _stub_exiting(path: pathlib.Path, status: int) -> None:
  """A recording stub that exits with `status`."""
  _write_stub(path)
  path.write_text(path.read_text() + f'exit {status}\n')


@pytest.mark.parametrize('status', [75, 1])
def test_slurm_job_requeues_itself_only_after_a_preemption(tmp_path, status):
  """srun exiting 75 (training saved a checkpoint on SIGTERM) -> scontrol requeue of this job, whose
  rerun resumes; any other failure ends the job with an error and no requeue."""
  _stub_exiting(_tools_dir(tmp_path, ('scontrol',)) / 'srun', status)
  result = _run('slurm_multinode.sh', ['--inside-job', *SLURM_ARGS], tmp_path, {**SLURM_ENV, 'SLURM_JOB_ID': '4242'})
  calls = _recorded_calls(tmp_path)
  assert calls[0][0] == 'srun'
  if status == 75:
    assert result.returncode == 0, result.stderr
    assert calls[1:] == [['scontrol', 'requeue', '4242']]
  else:
    assert result.returncode != 0 and 'exit status 1 (not a preemption)' in result.stderr
    assert calls[1:] == []


def test_slurm_fails_clearly_without_sbatch(tmp_path):
  result = _run('slurm_multinode.sh', SLURM_ARGS, tmp_path)
  assert result.returncode != 0 and "'sbatch' not found" in result.stderr
  result = _run('slurm_multinode.sh', ['--inside-job', *SLURM_ARGS], tmp_path)
  assert result.returncode != 0 and "'srun' not found" in result.stderr


# A gcloud whose TPU is preempted during the first training round: the ssh session fails (255) and
# describe reports PREEMPTED; the next round trains to the end.
PREEMPTED_GCLOUD = """
case "$*" in
  *' describe '*) cat "$STUB_LOG.state" 2>/dev/null ;;
  *' delete '*) rm -f "$STUB_LOG.state" ;;
  *dunet_jax.main*)
    if [ ! -e "$STUB_LOG.trained" ]; then touch "$STUB_LOG.trained"; echo PREEMPTED > "$STUB_LOG.state"; exit 255; fi ;;
esac
"""


def test_tpu_recreates_a_preempted_tpu_and_resumes(tmp_path):
  gcloud = _tools_dir(tmp_path, ('gcloud',)) / 'gcloud'
  gcloud.write_text(gcloud.read_text() + PREEMPTED_GCLOUD)
  result = _run('tpu_vm.sh', TPU_ARGS, tmp_path, {**TPU_ENV, 'RESTART_DELAY': '0'})
  assert result.returncode == 0, result.stderr
  verbs = [call[4] for call in _recorded_calls(tmp_path)]
  trains = [call for call in _recorded_calls(tmp_path) if 'dunet_jax.main' in call[-1]]
  assert len(trains) == 2 and trains[0] == trains[1]  # the same command resumes from the checkpoint
  # Round 1: created, code copied (scp, ssh unpack), installed (ssh), trained (ssh: the session is
  # lost), found PREEMPTED. Round 2: deleted, recreated, and the same steps to the end.
  steps = ['create', 'scp', 'ssh', 'ssh', 'ssh']
  assert verbs == ['describe', *steps, 'describe', 'describe', 'delete', *steps]
  assert 'restart 1 of 20' in result.stdout


def test_tpu_does_not_restart_after_a_real_failure(tmp_path):
  gcloud = _tools_dir(tmp_path, ('gcloud',)) / 'gcloud'
  gcloud.write_text(gcloud.read_text() + 'case "$*" in *describe*) echo READY ;; *dunet_jax.main*) exit 1 ;; esac\n')
  result = _run('tpu_vm.sh', TPU_ARGS, tmp_path, {**TPU_ENV, 'RESTART_DELAY': '0'})
  assert result.returncode != 0 and 'exit status 1 (not a preemption)' in result.stderr
  assert sum('dunet_jax.main' in call[-1] for call in _recorded_calls(tmp_path)) == 1
