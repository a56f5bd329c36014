"""`accelerate launch --multi_gpu --num_processes 2` with no GPU: two CPU processes over gloo, runs the same distillation as one process with the same
global batch: the final student weights agree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..conftest import REPO

SCRIPT = Path(__file__).with_name("ddp_train.py")


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    ddp, single = tmp_path / "ddp" / "w.safetensors", tmp_path / "single" / "w.safetensors"
    ddp.parent.mkdir()
    single.parent.mkdir()
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", str(SCRIPT), str(ddp), "4"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(ddp), "pt") as f:
        assert f.metadata()["world_size"] == "2"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(single), "8"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(ddp)), load_file(str(single))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    from optimum_agentos.distillation import make_student

    from .test_trainer import tiny_bert

    initial = make_student(tiny_bert(4), num_layers=2).state_dict()
    assert (a["classifier.weight"] - initial["classifier.weight"]).abs().max() > 1e-3  # it did train
