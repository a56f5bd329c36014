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


def launcher(mode: str, device: str) -> list[str]:
    """accelerate launch's back-end flags: on CPU `--multi_gpu` gives MULTI_CPU over gloo; on CUDA the launch users
    run (`--use_fsdp` also starts a single process as a distributed one)."""
    if device == "cpu" or mode == "ddp":
        return ["--multi_gpu"]
    if mode == "zero3":
        return ["--use_deepspeed", "--zero_stage", "3"]
    return ["--use_fsdp", "--fsdp_version", mode[-1]]


def train(out: Path, mode: str, processes: int, per_device_batch: int, device: str = "cpu") -> list[dict]:
    """Run distributed_train.py (under `accelerate launch` unless MODE is single); return each rank's report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [str(SCRIPT), str(out), mode, str(per_device_batch), device]
    if mode == "single":
        command = [sys.executable, *command]
    else:
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        port = str(29500 + os.getpid() % 1000)
        command = [ACCELERATE, "launch", *launcher(mode, device), "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", port, *command]
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


def check_teacher_sharded(reports: list[dict], after_training: bool = True, padded: bool = False) -> None:
    total, world = reports[0]["teacher_total_numel"], len(reports)
    local = [r["teacher_local_numel"] for r in reports]
    if not padded:  # ZeRO-3 pads each parameter's partitions to equal sizes
        assert sum(local) == total, (local, total)  # each element of the teacher lives on exactly one process
    assert max(local) <= 1.1 * total / world, (local, total)  # an even split, give or take a row
    if after_training:  # the gathered weights are freed after each forward (the teacher has no backward to do it)
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


@pytest.mark.skipif(CUDA_DEVICES == 0, reason="needs CUDA: accelerate 1.x enables FSDP and DeepSpeed only on "
                    "accelerators; on CPU it runs DDP and its FSDP1 plugin raises 'There are currently no available "
                    "devices found'")
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2", "zero3"])
def test_sharded_teacher_on_cuda(mode, one_process, tmp_path):
    """Launched as users launch it, on up to 2 GPUs (one GPU: a world of one, still through FSDP / DeepSpeed)."""
    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    reports = train(tmp_path, mode, min(2, CUDA_DEVICES), 4 if CUDA_DEVICES > 1 else 8, device="cuda")
    reference_report = one_process[1]
    for report in reports:
        assert report["teacher_device"].startswith("cuda"), report
        assert report["teacher_type"] != "LlamaForCausalLM", report  # wrapped (FSDP) or an engine (DeepSpeed)
        # CUDA kernels differ from CPU ones: the same losses, within a looser tolerance
        torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(reference_report["losses"]),
                                   rtol=2e-3, atol=1e-4)
    # FSDP1's root unit (embeddings, final norm, head) stays gathered after a forward that has no backward
    check_teacher_sharded(reports, after_training=mode == "fsdp2", padded=mode == "zero3")
