"""Saving never loses data: a user's files are never removed, the switch to a new checkpoint is atomic, and a save
that was killed is recovered by the next one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig
from optimum_agentos.formats.folder import (
    MANIFEST,
    UnsafeOverwriteError,
    atomic_directory,
    foreign_files,
    recover_interrupted_save,
    remove_stale_folders,
    save_model_folder,
    scratch_directory,
)
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import REPO, build_tiny, model_output, sample_ids


def test_user_file_survives_and_the_error_names_it(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    with pytest.raises(UnsafeOverwriteError, match="thesis.txt"):
        Quantizer(build_tiny("llama")).quantize(folder, AgentOSConfig(bits=4))
    assert (folder / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # nothing written beside it either


def test_user_file_added_to_a_checkpoint_blocks_its_replacement(tmp_path):
    folder = tmp_path / "ckpt"
    Quantizer(build_tiny("llama")).quantize(folder, AgentOSConfig(bits=4))
    (folder / "notes" ).mkdir()
    (folder / "notes" / "mine.md").write_text("mine")
    with pytest.raises(UnsafeOverwriteError, match="notes/mine.md"):
        Quantizer(build_tiny("llama", seed=1)).quantize(folder, AgentOSConfig(bits=4))
    assert (folder / "notes" / "mine.md").read_text() == "mine"


def test_save_to_working_directory_refused(tmp_path, monkeypatch):
    (tmp_path / "data.csv").write_text("a,b\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeOverwriteError, match="data.csv"):
        Quantizer(build_tiny("llama")).quantize(".", AgentOSConfig(bits=4))
    assert (tmp_path / "data.csv").read_text() == "a,b\n"


def test_own_checkpoint_is_replaced_and_manifest_lists_every_file(tmp_path):
    folder = tmp_path / "ckpt"
    Quantizer(build_tiny("llama", seed=0)).quantize(folder, AgentOSConfig(bits=4))
    model = Quantizer(build_tiny("llama", seed=5)).quantize(folder, AgentOSConfig(bits=8))
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert all(manifest["files"][n] == (folder / n).stat().st_size for n in on_disk)
    ids = sample_ids()
    assert AutoModelForCausalLM.from_pretrained(folder).config.quantization_config.bits == 8
    assert (model_output(AutoModelForCausalLM.from_pretrained(folder), ids) - model_output(model, ids)).abs().max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or backup folder left


def test_checkpoint_without_manifest_from_an_earlier_version_is_recognised(tmp_path):
    folder = tmp_path / "ckpt"
    Quantizer(build_tiny("llama")).quantize(folder, AgentOSConfig(bits=4))
    (folder / MANIFEST).unlink()
    assert foreign_files(folder) == []
    (folder / "other.txt").write_text("x")
    assert foreign_files(folder) == [n for n in sorted(os.listdir(folder)) if n != MANIFEST]  # all, unrecognised


def test_saved_folder_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        Quantizer(build_tiny("llama")).quantize(tmp_path / "ckpt", AgentOSConfig(bits=4))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755


def test_two_rename_fallback_killed_in_between_is_restored(tmp_path):
    """The fallback switch (no renameat2) renames the old folder to a backup first; if the process dies before the
    second rename, the next save (or `recover_interrupted_save`) puts the backup back."""
    folder = tmp_path / "ckpt"
    Quantizer(build_tiny("llama")).quantize(folder, AgentOSConfig(bits=4))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    dead = _dead_pid()
    os.rename(folder, tmp_path / f".ckpt.agentos-old-{dead}-abcd1234")
    (tmp_path / f".ckpt.agentos-tmp-{dead}-ffff0000").mkdir()  # the half-written new folder
    recover_interrupted_save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".ckpt.agentos-tmp-{dead}-0badc0de").mkdir()
    (tmp_path / f".ckpt.agentos-tmp-{dead}-0badc0de" / "model.safetensors").write_bytes(b"half")
    Quantizer(build_tiny("llama")).quantize(tmp_path / "ckpt", AgentOSConfig(bits=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_scratch_folders_removed_only_when_marked_and_their_process_is_gone(tmp_path):
    """A dead process's scratch folder holding the marker goes; a user's folder of the same name (no marker), a
    live process's folder and anything without the tag stay."""
    dead = _dead_pid()
    ours, users = tmp_path / f".scratch-{dead}-0badc0de", tmp_path / f".scratch-{dead}-mine"
    live, other = tmp_path / f".scratch-{os.getpid()}-c0ffee00", tmp_path / f"scratch-{dead}-0badc0de"
    for folder in (ours, users, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    for folder in (ours, live, other):
        (folder / ".marker").touch()
    assert remove_stale_folders(tmp_path, ".scratch-", ".marker") == [ours]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([users.name, live.name, other.name])
    with scratch_directory(tmp_path, ".scratch-", ".marker") as work:
        assert work.name.startswith(f".scratch-{os.getpid()}-") and (work / ".marker").is_file()
    assert not work.exists() and users.exists() and live.exists()


def test_empty_scratch_folder_of_a_killed_process_is_removed(tmp_path):
    """A kill between `mkdir` and the marker leaves an empty, unmarked folder: it goes, a non-empty one stays."""
    dead = _dead_pid()
    empty, full = tmp_path / f".scratch-{dead}-0badc0de", tmp_path / f".scratch-{dead}-mine"
    empty.mkdir()
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert remove_stale_folders(tmp_path, ".scratch-", ".marker") == [empty]
    assert (full / "notes.txt").read_text() == "mine" and not empty.exists()


def test_carry_over_keeps_trainer_checkpoints(tmp_path):
    folder = tmp_path / "out"
    (folder / "checkpoint-3").mkdir(parents=True)
    (folder / "checkpoint-3" / "trainer_state.json").write_text("{}")
    keep = lambda name: name.startswith("checkpoint-")  # noqa: E731
    save_model_folder(build_tiny("llama"), None, folder, carry_over=keep)
    assert (folder / "checkpoint-3" / "trainer_state.json").read_text() == "{}"
    assert (folder / "config.json").is_file()
    save_model_folder(build_tiny("llama", seed=2), None, folder, carry_over=keep)  # replaced again, still kept
    assert (folder / "checkpoint-3" / "trainer_state.json").read_text() == "{}"


def test_failure_inside_the_block_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "ckpt"
    with atomic_directory(folder) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(folder) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("disk full")
    assert (folder / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(UnsafeOverwriteError, match="is a file"):
        save_model_folder(build_tiny("llama"), None, tmp_path / "ckpt")
    assert (tmp_path / "ckpt").read_text() == "not a folder"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_cli_refuses_a_folder_of_user_files_in_one_line(tmp_path, tiny_folder):
    model = tiny_folder("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.me").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "optimum_agentos.cli", "quantize", "--model", str(model), "--output", str(out),
         "--bits", "4", "--method", "rtn", "--overwrite"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert proc.returncode != 0
    assert "keep.me" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "keep.me").read_text() == "x"


def test_concurrent_saves_leave_one_complete_checkpoint(tmp_path):
    """Two processes saving to the same folder: both succeed, and the folder holds one of the two checkpoints,
    complete and loadable."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.conftest import build_tiny
        from optimum_agentos import AgentOSConfig
        from optimum_agentos.quantization.quantizer import Quantizer
        Quantizer(build_tiny("llama", seed=int(sys.argv[1]))).quantize({str(tmp_path / "ckpt")!r}, AgentOSConfig(bits=4))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seed)], stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert foreign_files(tmp_path / "ckpt") == []
    AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_files_added_to_a_checkpoint_later_are_recorded_and_other_files_still_block(tmp_path):
    """A report written inside a saved checkpoint is recorded in its manifest, so the checkpoint stays replaceable;
    a file of the same name that the library did not record blocks the save (nothing is exempt by name)."""
    from optimum_agentos.formats.folder import record_written

    folder = tmp_path / "ckpt"
    Quantizer(build_tiny("llama")).quantize(folder, AgentOSConfig(bits=4))
    (folder / "report").mkdir()
    (folder / "report" / "report.json").write_text("{}")
    record_written(folder / "report" / "report.json")
    assert foreign_files(folder) == []
    (folder / "report.md").write_text("my own notes")  # a name the library also uses, but not written by it
    assert foreign_files(folder) == ["report.md"]
    with pytest.raises(UnsafeOverwriteError, match="report.md"):
        Quantizer(build_tiny("llama", seed=1)).quantize(folder, AgentOSConfig(bits=4))
    assert (folder / "report.md").read_text() == "my own notes"
