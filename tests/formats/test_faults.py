"""Fault injection, a representative subset (the full set: `python benchmarks/reliability.py`, RELIABILITY.md).

Real processes killed with SIGKILL at chosen points of quantize / prune / save / push / distill, a real full
filesystem (a small tmpfs where mounting is allowed, ENOSPC raised at chosen writes everywhere), concurrent saves
and corrupt files. Each case checks that nothing was lost: `save_dir` holds the old checkpoint (bit-identical
logits) or the complete new one, the user's files beside it are untouched, and the next save succeeds and leaves no
`.agentos-tmp` / `.agentos-old` folder."""

from __future__ import annotations

import re
import shutil
import signal

import pytest
import torch

from benchmarks import reliability as rel


@pytest.fixture(autouse=True)
def one_thread():
    """The children run on one thread; so does this process while it compares logits bit for bit with theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The old checkpoint (RTN, seed 0) with its logits, and the logits of an uninterrupted RTN child."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rel.make_references(tmp_path_factory.mktemp("refs"), ["rtn"])
    finally:
        torch.set_num_threads(threads)


def _explain(results):
    return "\n".join(f"{'pass' if r.ok else 'FAIL'} {r.case}: {r.detail}" for r in results)


TEST_POINTS = [p for p in rel.KILL_POINTS if p[0] in rel.QUICK_KILL_POINTS]


@pytest.mark.parametrize("name, op, fault_args, options", TEST_POINTS,
                         ids=[re.sub(r"[^a-z0-9]+", "-", p[0]).strip("-") for p in TEST_POINTS])
def test_kill_point_loses_nothing(refs, tmp_path, name, op, fault_args, options):
    result = rel.run_kill_point(tmp_path, refs, name, op, fault_args, options)
    assert result.ok and not result.lost_data, result.detail


def test_kill_hook_really_kills_at_the_chosen_call(tmp_path):
    """The harness itself: a child whose 2nd `os.fsync` is hooked dies by SIGKILL and leaves the temp folder that
    the next save removes (so a kill point that is never reached cannot pass unnoticed)."""
    rc, err, out = rel.run_child({"op": "rtn", "save_dir": str(tmp_path / "ckpt"),
                                  "fault": dict(target="os:fsync", n=2)})
    assert rc == -signal.SIGKILL, err[-2000:]
    assert "READY" in out and "DONE" not in out
    assert len(rel.leftovers(tmp_path)) == 1 and not (tmp_path / "ckpt").exists()
    rel.run_operation("rtn", str(tmp_path / "ckpt"), seed=2)
    assert rel.leftovers(tmp_path) == []


def test_full_disk_fails_with_enospc_and_keeps_the_old_checkpoint(tmp_path):
    results = rel.run_disk_full_cases(tmp_path, quick=True)
    assert all(r.ok for r in results), _explain(results)


def test_concurrent_saves_with_the_fallback_switch(refs, tmp_path):
    results = rel.run_concurrent_cases(tmp_path, refs, quick=True)
    assert all(r.ok for r in results), _explain(results)


def test_corrupt_checkpoints_never_load_silently(refs, tmp_path):
    results = rel.run_corrupt_cases(tmp_path, refs, quick=True)
    assert not any(r.silent_load for r in results), _explain([r for r in results if r.silent_load])
    assert all(r.ok for r in results), _explain(results)


def test_push_killed_mid_upload_leaves_old_or_new_revision(tmp_path):
    results = rel.run_push_cases(tmp_path, [0.5], commit_points=False)
    assert all(r.ok for r in results), _explain(results)


def test_distillation_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    results = rel.run_distill_cases(tmp_path, quick=True)
    assert all(r.ok for r in results), _explain(results)


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
def test_checkpoint_missing_a_float_tensor_is_refused(refs, tmp_path, tensor):
    """Found by the corrupt-file cases: a float tensor missing from a checkpoint loaded at random init."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(refs["old_folder"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors[tensor]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=re.escape(tensor)):
        rel.logits_of(folder)


def test_recovery_waits_for_a_save_that_is_switching(tmp_path):
    """A save killed between the two renames of the fallback leaves `save_dir` missing and its backup beside it.
    The recovery that the next save starts with must not put the backup back while a third process, holding the
    parent folder's lock, is renaming its own new folder into place (both renames would target `save_dir`)."""
    import subprocess
    import sys
    import textwrap
    import threading

    from optimum_agentos.formats.folder import recover_interrupted_save

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backup = tmp_path / f".ckpt.agentos-old-{int(dead.stdout)}-abcd1234"
    backup.mkdir()
    (backup / "model.safetensors").write_text("old")
    new = tmp_path / ".ckpt.agentos-tmp-1-ffff0000"  # the switching process's new folder
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    switcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("LOCKED", flush=True)
        sys.stdin.readline()
        os.rename({str(new)!r}, {str(tmp_path / "ckpt")!r})  # what _switch does when save_dir is missing
        print("RENAMED", flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert switcher.stdout.readline().strip() == "LOCKED"
        recovery = threading.Thread(target=recover_interrupted_save, args=(tmp_path / "ckpt",))
        recovery.start()
        recovery.join(timeout=1.0)
        assert recovery.is_alive(), "the recovery ran while another process held the lock"
        switcher.stdin.write("go\n")
        switcher.stdin.flush()
        assert switcher.stdout.readline().strip() == "RENAMED"
        recovery.join(timeout=30)
    finally:
        switcher.kill()
        switcher.wait()
    assert (tmp_path / "ckpt" / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the stale backup removed, nothing restored over it
