"""`DistillationTrainer` in two processes through `accelerate launch`, against one process with the same global batch:
the same step losses and final student, the teacher laid out like the student (a whole copy per process under DDP,
one shard per process under FSDP), and a saved student that reloads in a fresh process with the trained logits.

On CPU the processes talk over gloo. accelerate 1.15 enables FSDP only on accelerator back ends: with CPU processes
`AcceleratorState` keeps `DistributedType.MULTI_CPU` and silently trains with DDP (state.py: FSDP is set only for
MULTI_GPU, MULTI_XPU, ...), and its FSDP1 plugin refuses outright ("There are currently no available devices found,
must be one of 'XPU', 'CUDA', 'MLU', 'NPU', 'MUSA', or 'HPU'."). torch's FSDP2 (`fully_shard`) does run on CPU over
gloo, so the CPU FSDP2 test sets accelerate's state to FSDP before the Trainer builds its Accelerator (see
`lift_accelerates_cpu_gate` in distributed_train.py); the rest is the real Trainer, accelerate and torch. The plain
launches of FSDP1, FSDP2 and DeepSpeed ZeRO-3 run on machines with two or more CUDA devices.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REPO, run_python

SCRIPT = Path(__file__).with_name("distributed_train.py")
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
CUDA_DEVICES = torch.cuda.device_count()


def train(out: Path, mode: str, processes: int, per_device_batch: int, device: str = "cpu") -> list[dict]:
    """Run distributed_train.py (under `accelerate launch` for more than one process); return each rank's report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [str(SCRIPT), str(out), mode, str(per_device_batch), device]
    if processes == 1:
        command = [sys.executable, *command]
    else:
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        port = str(29500 + os.getpid() % 1000)
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, *command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def check_against_one_process(out: Path, reports: list[dict], reference: Path, reference_report: dict) -> None:
    for report in reports:
        assert report["world_size"] == len(reports)
        # Step losses are means over the global batch (each rank's mean, averaged): the same as one process's.
        torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(reference_report["losses"]),
                                   rtol=1e-4, atol=1e-6)
    assert reports[0]["losses"][-1] < 0.8 * reports[0]["losses"][0]  # it learns
    trained, single = load_file(str(out / "student" / "model.safetensors")), load_file(
        str(reference / "student" / "model.safetensors"))
    assert trained.keys() == single.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], single[name], rtol=1e-4, atol=5e-5, msg=name)
    # The saved student, loaded by a fresh interpreter, gives the logits the trained model gave in training.
    run_python(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        import sys; sys.path.insert(0, {str(REPO)!r})
        from tests.distillation.distributed_train import PROBE

        model = AutoModelForCausalLM.from_pretrained({str(out / 'student')!r})
        with torch.no_grad():
            logits = model(input_ids=PROBE).logits
        torch.testing.assert_close(logits, load_file({str(out / 'logits.safetensors')!r})["logits"],
                                   rtol=1e-5, atol=1e-5)
    """)


def check_teacher_sharded(reports: list[dict]) -> None:
    total = reports[0]["teacher_total_numel"]
    local = [r["teacher_local_numel"] for r in reports]
    assert sum(local) == total, (local, total)  # each element of the teacher lives on exactly one process
    assert max(local) <= 0.55 * total, (local, total)  # an even split, give or take a row
    # ...and still after training: the teacher's gathered weights are freed after each forward (it has no backward).
    assert [r["teacher_local_numel_after_training"] for r in reports] == local


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one plain process with the global batch (8)."""
    out = tmp_path_factory.mktemp("single")
    return out, train(out, "single", 1, 8)[0]


def test_ddp_keeps_a_plain_teacher_per_process_and_matches_one_process(one_process, tmp_path):
    reports = train(tmp_path, "ddp", 2, 4)
    check_against_one_process(tmp_path, reports, *one_process)
    for report in reports:  # a whole frozen copy, not wrapped in DistributedDataParallel: nothing to synchronize
        assert report["teacher_type"] == "LlamaForCausalLM"
        assert report["teacher_local_numel"] == report["teacher_total_numel"]


def test_fsdp2_on_cpu_shards_the_teacher_like_the_student_and_matches_one_process(one_process, tmp_path):
    reports = train(tmp_path, "fsdp2", 2, 4)
    check_against_one_process(tmp_path, reports, *one_process)
    assert {r["teacher_type"] for r in reports} == {"FSDPLlamaForCausalLM"}  # fully_shard's class
    check_teacher_sharded(reports)


@pytest.mark.skipif(CUDA_DEVICES < 2, reason=f"needs 2 CUDA devices (found {CUDA_DEVICES}): accelerate 1.x enables "
                    "FSDP and DeepSpeed only on accelerators; on CPU it runs DDP and its FSDP1 plugin raises 'There are "
                    "currently no available devices found'")
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2", "zero3"])
def test_sharded_teacher_on_cuda(mode, one_process, tmp_path):
    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    reports = train(tmp_path, mode, 2, 4, device="cuda")
    reference_report = one_process[1]
    for report in reports:  # CUDA kernels differ from CPU ones: compare losses only, loosely
        torch.testing.assert_close(report["losses"][0], reference_report["losses"][0], rtol=1e-3, atol=1e-4)
    if mode == "fsdp2":
        check_teacher_sharded(reports)
    else:  # FSDP1 flat parameters and ZeRO-3 partitions pad to equal sizes, and FSDP1 keeps the root gathered
        total = reports[0]["teacher_total_numel"]
        assert all(r["teacher_local_numel"] < 0.6 * total for r in reports)
