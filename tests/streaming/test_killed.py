"""A streamed run killed (SIGKILL, a real child process) after some blocks are on disk leaves no half-written
output: the save folder keeps the previous checkpoint byte for byte (or does not exist), and the next run removes
what the killed one left (its temporary folder, its spilled activations) and writes the same checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch

from optimum_agentos import AgentOSConfig, Quantizer

from ..conftest import REPO, build_tiny
from .test_streamed import IDS, assert_same_checkpoint, save_sharded

CHILD = """
import os, signal, sys, torch
from optimum_agentos import AgentOSConfig, Quantizer
from optimum_agentos.streaming import pipeline

src, out, spill, ids = sys.argv[1], sys.argv[2], sys.argv[3], torch.load(sys.argv[4])
written = []
done_block = pipeline.BlockStream.done_block

def done_then_die(self, name):
    done_block(self, name)  # the block is quantized and its part file written
    written.append(name)
    if len(written) == 2:
        print("killing after", written, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

pipeline.BlockStream.done_block = done_then_die
Quantizer.from_pretrained(src, streaming=True).quantize(
    out, AgentOSConfig(bits=4, group_size=64, method="gptq"), ids, batch_size=2, buffer_memory=160_000, spill_dir=spill)
print("not killed", flush=True)
"""


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_mid_run(tmp_path, src, out, spill):
    torch.save(IDS, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(src), str(out), str(spill),
                           str(tmp_path / "ids.pt")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "killing after" in proc.stdout


def test_killed_streamed_run_leaves_nothing_half_written(tmp_path):
    src = save_sharded(build_tiny("llama", num_hidden_layers=4), tmp_path / "src", torch.float32)
    config = AgentOSConfig(bits=4, group_size=64, method="gptq")
    save = tmp_path / "save"
    Quantizer.from_pretrained(src, streaming=True).quantize(save, config, IDS, batch_size=2)
    before = files(save)
    spill = tmp_path / "spill"

    kill_mid_run(tmp_path, src, save, spill)
    assert files(save) == before  # the previous checkpoint, byte for byte
    leftovers = list(tmp_path.glob(".save.agentos-tmp-*"))
    assert len(leftovers) == 1 and list(leftovers[0].glob(".part-*.safetensors"))  # it died with blocks written
    assert len(list(spill.glob("agentos-activations-*"))) == 1  # and activations spilled

    kill_mid_run(tmp_path, src, tmp_path / "fresh", spill)
    assert not (tmp_path / "fresh").exists()  # a first save killed: no output folder at all

    Quantizer.from_pretrained(src, streaming=True).quantize(save, config, IDS, batch_size=2, buffer_memory=160_000,
                                                           spill_dir=spill)
    assert not list(tmp_path.glob(".save.agentos-tmp-*"))
    assert not list(spill.iterdir())  # the killed runs' spilled activations are gone, and this run's own
    reference = tmp_path / "reference"
    Quantizer.from_pretrained(src).quantize(reference, config, IDS, batch_size=2)
    assert_same_checkpoint(reference, save)  # the rerun writes what an uninterrupted in-memory run writes


def test_stale_spill_cleanup_leaves_folders_it_did_not_write(tmp_path):
    """Only a dead process's spill folder holding the library's marker is removed; a user's folder of the same name
    (no marker), and a live process's folder, stay."""
    from optimum_agentos.streaming.buffer import _SPILL_MARKER, remove_stale_spills

    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    ours = tmp_path / f"agentos-activations-{dead_pid}-abc123-x"
    users = tmp_path / f"agentos-activations-{dead_pid}-mine"
    live = tmp_path / f"agentos-activations-{os.getpid()}-def456-y"
    for folder in (ours, users, live):
        folder.mkdir()
        (folder / "batch-000000.safetensors").write_bytes(b"x")
    (ours / _SPILL_MARKER).touch()
    (live / _SPILL_MARKER).touch()
    assert remove_stale_spills(tmp_path) == [ours]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([users.name, live.name])
