"""Read dataset files the same way from an extracted folder or from the official tar archive.

Users download archives by hand and may or may not extract them; builders see one interface.
Uncompressed tars (VOC's .tar) are read member by member without extracting anything; compressed
ones (SBD's .tgz) cannot be seeked, so one streaming pass keeps the members a builder asks for.
"""
import tarfile
from typing import Callable, Protocol

from etils import epath

from dunet_jax import storage


class FileTree(Protocol):
  """Files below one root, addressed by '/'-separated paths relative to it."""

  def read(self, relpath: str) -> bytes:
    """The file's bytes; FileNotFoundError naming where it was looked for when absent."""

  def exists(self, relpath: str) -> bool:
    ...

  def describe(self, relpath: str) -> str:
    """Where relpath lives, for messages (a path, or archive:member)."""


class DirectoryTree:
  """A folder on disk."""

  def __init__(self, root: storage.PathLike):
    self.root = storage.path(root)

  def read(self, relpath: str) -> bytes:
    path = self.root / relpath
    if not path.is_file():
      raise FileNotFoundError(f'{path}: file not found')
    return path.read_bytes()

  def exists(self, relpath: str) -> bool:
    return (self.root / relpath).is_file()

  def describe(self, relpath: str) -> str:
    return str(self.root / relpath)


def _member_name(name: str) -> str:
  return name[2:] if name.startswith('./') else name


class TarTree:
  """Members of a tar archive below `prefix` (e.g. 'VOCdevkit/VOC2012/').

  `keep(relpath)` selects the members held in memory when the archive is compressed; an
  uncompressed archive is indexed once and each member is read on demand.
  """

  def __init__(self, archive: storage.PathLike, prefix: str, keep: Callable[[str], bool] = lambda _: True):
    self.archive = storage.path(archive)
    self.prefix = prefix
    self._members: dict[str, tarfile.TarInfo] = {}
    self._contents: dict[str, bytes] = {}
    try:
      self._tar = tarfile.open(fileobj=self.archive.open('rb'), mode='r:')
    except tarfile.ReadError:
      self._tar = None
    try:
      if self._tar is not None:
        for member in self._tar:
          relpath = self._relpath(member)
          if relpath is not None:
            self._members[relpath] = member
      else:
        with self.archive.open('rb') as file, tarfile.open(fileobj=file, mode='r|*') as stream:
          for member in stream:
            relpath = self._relpath(member)
            if relpath is not None and keep(relpath):
              self._contents[relpath] = stream.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
      raise OSError(f'{self.archive}: cannot read the archive ({error}); download it again') from error

  def _relpath(self, member: tarfile.TarInfo) -> str | None:
    name = _member_name(member.name)
    if not member.isfile() or not name.startswith(self.prefix):
      return None
    return name[len(self.prefix):]

  def read(self, relpath: str) -> bytes:
    if relpath in self._contents:
      return self._contents[relpath]
    if relpath not in self._members:
      raise FileNotFoundError(f'{self.describe(relpath)}: member not found in the archive')
    try:
      return self._tar.extractfile(self._members[relpath]).read()
    except (tarfile.TarError, OSError, EOFError) as error:
      raise OSError(f'{self.describe(relpath)}: cannot read the member ({error})') from error

  def exists(self, relpath: str) -> bool:
    return relpath in self._contents or relpath in self._members

  def describe(self, relpath: str) -> str:
    return f'{self.archive}:{self.prefix}{relpath}'


def find_tree(manual_dir: epath.Path, folders: tuple[str, ...], archive: str, prefix: str,
              marker: str, keep: Callable[[str], bool] = lambda _: True) -> FileTree | None:
  """The first extracted folder (relative to manual_dir) holding `marker`, else the archive.

  Returns None when neither is there.
  """
  for folder in folders:
    if (manual_dir / folder / marker).exists():
      return DirectoryTree(manual_dir / folder)
  if (manual_dir / archive).is_file():
    return TarTree(manual_dir / archive, prefix, keep)
  return None


def read_id_list(tree: FileTree, relpath: str) -> list[str]:
  """Image ids, one per line (VOC ImageSets and SBD train.txt / val.txt)."""
  return [line.split()[0] for line in tree.read(relpath).decode().splitlines() if line.strip()]
