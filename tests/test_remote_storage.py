"""gs:// paths end to end against a real GCS-protocol server (fake-gcs-server on localhost).

Every object is checked through the server's own JSON API, not through the client under test.
One two-process training run on gs:// is shared by the tests that read a run. TFDS reads prepared
data with tf.data through TensorFlow's GCS client, which cannot be pointed at an emulator, so the
training runs keep their prepared data on local disk; `test_tfds_data_dir_on_gcs` covers what of a
gs:// tfds_data_dir goes through epath, and checks that tf.data is handed gs:// file names.
"""
import json
import os
import pathlib
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from dunet_jax import checkpoint, inference, storage
from helpers import REPO_ROOT
from training_runs import free_coordinator_address, process_flags, saved_params, start

BUCKET = 'dunet-test'
NUM_STEPS = 4


def _objects(emulator, prefix: str) -> dict[str, int]:
  """{object name: size} under `prefix` in the test bucket, straight from the server's JSON API."""
  query = urllib.parse.urlencode({'prefix': prefix})
  with urllib.request.urlopen(f'{emulator.url}/storage/v1/b/{BUCKET}/o?{query}', timeout=30) as response:
    return {item['name']: int(item['size']) for item in json.load(response).get('items', [])}


def _read_object(emulator, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f'{emulator.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media', timeout=30) as response:
    return response.read()


def _step_folders(emulator, run: str) -> dict[int, set[str]]:
  """{step: names of its objects} under <run>/checkpoints/ (run is 'gs://bucket/name')."""
  prefix = run.removeprefix(f'gs://{BUCKET}/') + '/checkpoints/'
  folders: dict[int, set[str]] = {}
  for name in _objects(emulator, prefix):
    step, _, rest = name[len(prefix):].partition('/')
    if step.isdigit():
      folders.setdefault(int(step), set()).add(rest)
  return folders


def _start_two_processes(workdir: str, data_dir: pathlib.Path, *overrides: str) -> list[subprocess.Popen]:
  """Two localhost processes x 2 CPU devices training the short run in `workdir`."""
  address = free_coordinator_address()
  return [start(workdir, data_dir, f'--config.train.num_steps={NUM_STEPS}', '--config.train.w_num_images=8',
                *overrides, devices=2, extra_flags=process_flags(address, index))
          for index in range(2)]


def _finish(processes: list[subprocess.Popen]) -> None:
  outputs = [process.communicate(timeout=600)[0] for process in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope='module')
def bucket(gcs_emulator) -> str:
  return gcs_emulator.create_bucket(BUCKET)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def remote_run(bucket, data_dir, gcs_emulator) -> str:
  """A finished two-process run whose workdir is on the emulator (checkpoints at steps 2 and 4)."""
  workdir = f'{bucket}/run'
  _finish(_start_two_processes(workdir, data_dir, '--config.train.checkpoint_every=2'))
  return workdir


def test_dunet_jax_paths_reach_the_gcs_server(gcs_emulator, bucket):
  """epath under dunet_jax writes gs:// objects to the server (TensorFlow's client could not)."""
  assert os.environ['EPATH_USE_TF'] == 'false'
  path = storage.path(f'{bucket}/probe') / 'hello.txt'
  assert str(path) == f'{bucket}/probe/hello.txt'  # pathlib would make it gs:/dunet-test/...
  path.write_text('hello')
  assert _read_object(gcs_emulator, 'probe/hello.txt') == b'hello'
  assert storage.path(f'{bucket}/probe').is_dir() and path.read_text() == 'hello'


def test_two_process_run_writes_everything_to_gcs(remote_run, gcs_emulator, tmp_path):
  objects = _objects(gcs_emulator, 'run/')
  for name in ('run/config.json', 'run/reconstruction.npz'):
    assert objects.get(name, 0) > 0, sorted(objects)
  folders = _step_folders(gcs_emulator, remote_run)
  assert sorted(folders) == [2, NUM_STEPS]
  assert all('commit_success.txt' in names for names in folders.values())  # orbax's marker on gs://
  recorded = json.loads(_read_object(gcs_emulator, 'run/config.json'))
  assert recorded['train']['num_steps'] == NUM_STEPS
  events = [name for name in objects if name.startswith('run/events.out.tfevents')]
  assert len(events) == 1, sorted(objects)
  local = tmp_path / pathlib.PurePath(events[0]).name
  local.write_bytes(_read_object(gcs_emulator, events[0]))
  from tensorboard.backend.event_processing import event_file_loader
  tags = {value.tag for event in event_file_loader.EventFileLoader(str(local)).Load()
          for value in event.summary.value}
  assert {'train/loss', 'train/learning_rate'} <= tags, tags
  assert not (REPO_ROOT / 'gs:').exists(), 'a gs:// path was written as a local folder'


def test_sigkill_during_a_gcs_save_then_resume_is_bit_identical(remote_run, bucket, data_dir, gcs_emulator):
  """On gs:// orbax marks a finished step with commit_success.txt instead of renaming a temporary
  folder: a step killed mid-save must be ignored and redone, and the run must end exactly where
  the uninterrupted one did."""
  workdir = f'{bucket}/killed'
  # The run's W, as the uninterrupted run fitted it (saves fitting it again).
  (storage.path(workdir) / checkpoint.RECONSTRUCTION_FILE).write_bytes(
      (storage.path(remote_run) / checkpoint.RECONSTRUCTION_FILE).read_bytes())
  processes = _start_two_processes(workdir, data_dir, '--config.train.checkpoint_every=1')
  deadline = time.monotonic() + 300
  torn = None
  while torn is None:
    assert all(p.poll() is None for p in processes), 'the run ended before a save could be interrupted'
    assert time.monotonic() < deadline, 'no save in progress was seen'
    started = {step: names for step, names in _step_folders(gcs_emulator, workdir).items()
               if 'commit_success.txt' not in names}
    torn = min(started) if started else None
    if torn is None:
      time.sleep(0.02)
  for process in processes:
    process.kill()
  for process in processes:
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
  folders = _step_folders(gcs_emulator, workdir)
  uncommitted = [step for step, names in folders.items() if 'commit_success.txt' not in names]
  assert uncommitted, f'every save had completed by the kill: {folders}'
  committed = [step for step in folders if step not in uncommitted]
  assert checkpoint.make_manager(workdir, read_only=True).all_steps() == committed

  _finish(_start_two_processes(workdir, data_dir, '--config.train.checkpoint_every=1'))
  folders = _step_folders(gcs_emulator, workdir)
  assert all('commit_success.txt' in folders[step] for step in uncommitted if step in folders)
  step, resumed = saved_params(workdir)
  reference_step, expected = saved_params(remote_run)
  assert step == reference_step == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_inference_and_evaluate_read_the_run_from_gcs(remote_run, gcs_emulator, tmp_path):
  local = tmp_path / 'run'
  for name in _objects(gcs_emulator, 'run/'):
    target = local / name.removeprefix('run/')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_read_object(gcs_emulator, name))
  remote_step, remote_params = saved_params(remote_run)
  local_step, local_params = saved_params(local)
  assert remote_step == local_step == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, remote_params, local_params)
  image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
  np.testing.assert_array_equal(inference.load(remote_run).probabilities(image),
                                inference.load(local).probabilities(image))
  workdir, step = inference.resolve_checkpoint(f'{remote_run}/checkpoints/2')
  assert (str(workdir), step) == (remote_run, 2)

  from dunet_jax import evaluate
  result, path = evaluate.evaluate_checkpoint(remote_run, {})
  assert str(path) == f'{remote_run}/eval_val_{NUM_STEPS}.json'
  written = json.loads(_read_object(gcs_emulator, f'run/eval_val_{NUM_STEPS}.json'))
  assert written['step'] == NUM_STEPS and written['miou'] == pytest.approx(result['miou'])


def test_unreadable_checkpoint_on_gcs_is_copied_aside(bucket, gcs_emulator):
  """On gs:// there is no rename: setting an unreadable step aside copies it whole, then deletes it."""
  import orbax.checkpoint as ocp
  workdir = f'{bucket}/corrupt'
  params = {'w': np.arange(4096, dtype=np.float32).reshape(64, 64), 'b': np.ones(64, np.float32)}
  manager = checkpoint.make_manager(workdir)
  for step in (1, 2):
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(jax.tree.map(lambda x: x * step, params))))
  manager.wait_until_finished()
  original = _step_folders(gcs_emulator, workdir)[2]
  damaged = [name for name in original if name.startswith('params/ocdbt.process_') and '/d/' in name]
  assert damaged, sorted(original)
  for name in damaged:
    (storage.path(workdir) / 'checkpoints' / '2' / name).write_bytes(b'\0' * 7)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
      jax.devices()[0])), params)
  restored, step = checkpoint.restore(manager, {'params': abstract}, set_aside_unreadable=True)
  manager.close()
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored['params'], params)
  names = _objects(gcs_emulator, 'corrupt/checkpoints/')
  aside = {name.split('/')[2] for name in names if name.split('/')[2].startswith('2.unreadable-')}
  assert len(aside) == 1, sorted(names)
  copied = {name.split('/', 3)[3] for name in names if name.split('/')[2] in aside}
  assert copied == original  # every object of the step, the damaged ones and the commit marker included
  assert 2 not in _step_folders(gcs_emulator, workdir)


def test_manual_dir_and_tfds_data_dir_on_gcs(bucket, gcs_emulator, tmp_path):
  """A gs:// manual_dir is read by the builder through epath; a gs:// tfds_data_dir is found prepared
  (TFDS keeps its bookkeeping through epath) and tf.data is handed gs:// shard names. tf.data reads
  those shards through TensorFlow's GCS client, which no emulator can stand in for."""
  from configs import synthetic as synthetic_config
  from dunet_jax.data import datasets, synthetic
  data = synthetic_config.get_config('test').data
  data.synthetic_num_train, data.synthetic_num_val = 3, 2
  data.manual_dir, data.tfds_data_dir = f'{bucket}/manual', str(tmp_path / 'tfds')
  builder = datasets.prepare(data)
  labels = [name for name in _objects(gcs_emulator, 'manual/') if '/SegmentationClass/' in name]
  assert len(labels) == 5
  for example in builder.as_dataset(split='train').as_numpy_iterator():
    index = int(example['id'].decode().split('_')[1])
    _, expected = synthetic.render_scene(np.random.default_rng([data.synthetic_seed, 0, index]))
    np.testing.assert_array_equal(example['label'][..., 0], expected)

  local = tmp_path / 'tfds'
  for file in local.rglob('*'):
    if file.is_file():
      target = storage.path(f'{bucket}/tfds') / str(file.relative_to(local))
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(file.read_bytes())
  data.tfds_data_dir = f'{bucket}/tfds'
  remote = datasets.prepare(data)
  assert str(remote.data_dir).startswith(f'{bucket}/tfds/') and remote.is_prepared()
  assert remote.info.splits['train'].num_examples == 3
  shards = [instruction.filename for instruction in remote.info.splits['train'].file_instructions]
  assert shards and all(shard.startswith(f'{bucket}/tfds/') for shard in shards)
