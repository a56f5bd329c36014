"""Saving a checkpoint folder without ever losing data.

A save writes into a fresh temporary folder beside `save_dir`, fsyncs it, records what it wrote in a manifest
(`agentos_manifest.json`) and then switches it with `save_dir` in one atomic exchange (Linux `renameat2`), so at
every instant `save_dir` holds either the complete old checkpoint or the complete new one. Where the exchange is not
available the switch is two renames, and a save that was killed between them is recovered by the next save (or by
`recover_interrupted_save`) from the backup it left.

An existing `save_dir` is replaced only when it is empty or is a checkpoint this library wrote; a file the library
did not write is never deleted or moved: the save fails first, naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from transformers.utils import logging

from ..version import __version__


logger = logging.get_logger(__name__)

MANIFEST = "agentos_manifest.json"
# Files the library adds to a checkpoint folder after saving it (card refresh, evaluation report, recipe summary);
# they are recorded in the manifest as they are written (`record_written`). The names recognise checkpoints of
# versions without a manifest.
LIBRARY_FILES = frozenset({"README.md", "agentos_card.json", "report.json", "report.md", "size_vs_quality.png",
                           "agentos_summary.json"})
# What `save_pretrained` of a model and tokenizer writes: recognizes checkpoints of versions without a manifest.
_LEGACY_SUFFIXES = (".safetensors", ".safetensors.index.json")
_LEGACY_NAMES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "spiece.model",
})
_TMP_TAG, _OLD_TAG = "agentos-tmp", "agentos-old"


class UnsafeOverwriteError(FileExistsError):
    """`save_dir` holds files this library did not write; replacing it would lose them."""


def folder_size(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    """Total bytes of the files matching `pattern` in a folder."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _is_legacy_checkpoint(folder: Path, names: list[str]) -> bool:
    """A folder written by a version before manifests: a `quant_method: agentos` config and only checkpoint files."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    ours = isinstance(quant, dict) and quant.get("quant_method") == "agentos"
    known = all(n in _LEGACY_NAMES or n in LIBRARY_FILES or n.endswith(_LEGACY_SUFFIXES) for n in names)
    return ours and known


def foreign_files(save_dir: str | os.PathLike, carry_over: Callable[[str], bool] | None = None) -> list[str]:
    """The files in `save_dir` (relative paths) that this library did not write and a save would have to remove.

    Entries whose top-level name `carry_over` accepts are carried into the new folder and never count."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return [] if not folder.exists() else [folder.name]
    names = [n for n in _relative_files(folder) if not (carry_over and carry_over(n.split(os.sep)[0]))]
    if not names:
        return []
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        written = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return [] if _is_legacy_checkpoint(folder, names) else names
    return [n for n in names if n not in written and n != MANIFEST]


def check_save_dir(save_dir: str | os.PathLike, overwrite: bool = True,
                   carry_over: Callable[[str], bool] | None = None) -> None:
    """Fail early, naming the files, when saving to `save_dir` would lose data or `overwrite` is off."""
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise UnsafeOverwriteError(f"{save_dir} is a file, not a folder; choose another save_dir.")
    if not save_dir.is_dir() or not any(save_dir.iterdir()):
        return
    foreign = foreign_files(save_dir, carry_over)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise UnsafeOverwriteError(
            f"{save_dir.absolute()} holds files optimum-agentos did not write ({shown}); it replaces only empty folders "
            "or checkpoints it saved itself. Choose another save_dir, or move those files away yourself."
        )
    if not overwrite and any(n not in LIBRARY_FILES for n in _relative_files(save_dir)
                             if not (carry_over and carry_over(n.split(os.sep)[0]))):
        raise FileExistsError(f"{save_dir} already holds a checkpoint; pass overwrite=True (CLI: --overwrite) to "
                              "replace it.")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems (e.g. certain FUSE mounts) do not fsync directories
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_path(Path(root, name))
        _fsync_path(Path(root), directory=True)


def _write_manifest(folder: Path) -> None:
    files = {n: os.path.getsize(folder / n) for n in _relative_files(folder) if n != MANIFEST}
    manifest = {"producer": "optimum-agentos", "version": __version__, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def record_written(*paths: str | os.PathLike) -> None:
    """Add files the library wrote into an already saved checkpoint (a refreshed card, a report, a summary) to the
    manifest of the checkpoint holding them (the file's folder or the one above it), so a later save may replace
    them; a file outside any checkpoint is left alone."""
    for path in map(Path, paths):
        for root in (path.parent, path.parent.parent):
            manifest_path = root / MANIFEST
            if manifest_path.is_file():
                manifest = json.loads(manifest_path.read_text())
                manifest["files"][str(path.relative_to(root))] = path.stat().st_size
                tmp = manifest_path.with_name(f".{MANIFEST}.{uuid.uuid4().hex[:8]}")
                tmp.write_text(json.dumps(manifest, indent=2) + "\n")
                os.replace(tmp, manifest_path)
                break


def _renameat2_exchange() -> Callable[[Path, Path], bool] | None:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is None:
        return None
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> bool:
        if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the filesystem cannot exchange: fall back
            return False
        raise OSError(code, os.strerror(code), str(b))

    return exchange


_EXCHANGE = _renameat2_exchange() if os.name == "posix" else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(parent: str | os.PathLike, tag: str, marker: str) -> list[Path]:
    """Remove the scratch folders killed processes left in `parent` (`<tag><pid>-...`, see `scratch_directory`)
    and return them: only a folder holding `marker`, the file the library writes into each, of a process that is
    gone. A user's folder of the same name (no marker) and a running process's folder are never touched, except an
    empty one of a dead process (a kill between `mkdir` and the marker): `os.rmdir` removes only empty folders."""
    removed = []
    for path in Path(parent).glob(f"{glob.escape(tag)}*"):
        pid = path.name[len(tag):].split("-")[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if (path / marker).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # not empty: a user's folder, left alone
                os.rmdir(path)
                removed.append(path)
    return removed


@contextlib.contextmanager
def scratch_directory(parent: str | os.PathLike, tag: str, marker: str) -> Iterator[Path]:
    """A private working folder `<tag><pid>-<random>` in `parent`, holding the file `marker`, removed on exit.

    A SIGKILL skips the removal, so the folders of killed runs are removed first (`remove_stale_folders`)."""
    parent = Path(parent)
    remove_stale_folders(parent, tag, marker)
    folder = parent / f"{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(folder, 0o700)
    try:
        (folder / marker).touch()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sibling(save_dir: Path, tag: str) -> Path:
    return save_dir.with_name(f".{save_dir.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _leftovers(save_dir: Path, tag: str) -> list[tuple[Path, int]]:
    found = []
    # escaped: a name with glob characters ("run[1]", "ckpt*") must match only its own leftovers
    for path in save_dir.parent.glob(f".{glob.escape(save_dir.name)}.{tag}-*"):
        try:
            found.append((path, int(path.name[len(f".{save_dir.name}.{tag}-"):].split("-")[0])))
        except ValueError:
            continue
    return found


def recover_interrupted_save(save_dir: str | os.PathLike) -> None:
    """Finish or undo a save of `save_dir` that a killed process left half done.

    A missing `save_dir` with a backup beside it (the two-rename fallback killed between its renames) gets its
    backup back; temporary folders and backups of dead processes are removed (they hold only what this library
    wrote), with a warning naming them."""
    save_dir = Path(save_dir).resolve()  # a symlinked save_dir: the folder it points to is the one replaced
    if not save_dir.parent.is_dir():
        return
    with _locked(save_dir.parent):  # not while another save switches folders: its rename and ours would collide
        for path, pid in _leftovers(save_dir, _OLD_TAG):
            if _pid_alive(pid) and pid != os.getpid():
                continue
            if not save_dir.exists():
                os.replace(path, save_dir)
                logger.warning(f"Restored {save_dir} from {path.name}, left by a save that was interrupted.")
            else:
                shutil.rmtree(path, ignore_errors=True)
                logger.warning(f"Removed {path}, the previous checkpoint left by an interrupted save.")
        for path, pid in _leftovers(save_dir, _TMP_TAG):
            if not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                logger.warning(f"Removed {path}, the unfinished folder of a save that was interrupted.")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` itself (no lock file is left behind): saves beside each other take turns."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _carry_into(old: Path, new: Path, carry_over: Callable[[str], bool]) -> None:
    """Hard-link (copy across filesystems) the entries `carry_over` accepts from the old folder into the new one."""
    for entry in old.iterdir():
        if not carry_over(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _switch(tmp: Path, save_dir: Path) -> Path | None:
    """Put `tmp` at `save_dir`; returns where the previous folder went (to delete), or None."""
    if not save_dir.exists():
        os.rename(tmp, save_dir)
        return None
    if _EXCHANGE is not None and _EXCHANGE(tmp, save_dir):
        return tmp  # tmp now holds the old checkpoint
    backup = _sibling(save_dir, _OLD_TAG)
    os.rename(save_dir, backup)  # a kill here leaves the backup: recover_interrupted_save restores it
    os.rename(tmp, save_dir)
    return backup


@contextlib.contextmanager
def atomic_directory(save_dir: str | os.PathLike, overwrite: bool = True,
                     carry_over: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `save_dir`; on success it replaces `save_dir` in one atomic switch.

    Refuses (before anything is written) a `save_dir` holding files the library did not write. A failure inside
    the block removes the temporary folder and leaves any existing `save_dir` untouched. `carry_over(name)` names
    top-level entries of the old folder to keep in the new one (e.g. a Trainer's `checkpoint-*` folders)."""
    save_dir = Path(save_dir).resolve()  # a symlink stays: the switch happens beside the folder it points to
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(save_dir)
    check_save_dir(save_dir, overwrite, carry_over)
    tmp = _sibling(save_dir, _TMP_TAG)
    os.mkdir(tmp, 0o777)  # the umask applies: the same permissions as any folder the user creates
    try:
        yield tmp
        _write_manifest(tmp)
        _fsync_tree(tmp)
        with _locked(save_dir.parent):
            check_save_dir(save_dir, overwrite, carry_over)  # again: files may have appeared while we wrote
            if carry_over is not None and save_dir.is_dir():
                _carry_into(save_dir, tmp, carry_over)
                _write_manifest(tmp)
            old = _switch(tmp, save_dir)
            _fsync_path(save_dir.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model_folder(
    model, tokenizer, save_dir, overwrite: bool = True, extra: Callable[[Path], None] | None = None,
    carry_over: Callable[[str], bool] | None = None, require_tokenizer: bool = False,
) -> Path:
    """`save_pretrained` model and tokenizer (and `extra(folder)`, e.g. a model card) atomically into `save_dir`.

    Without a tokenizer the checkpoint is saved with a warning saying so (an error with `require_tokenizer`)."""
    if tokenizer is None:
        message = (f"{save_dir} is saved without tokenizer files (no tokenizer was loaded or passed); pass "
                   "tokenizer= so the checkpoint can be used on its own.")
        if require_tokenizer:
            raise ValueError(message)
        logger.warning(message)
    with atomic_directory(save_dir, overwrite=overwrite, carry_over=carry_over) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(save_dir)
