"""Run by test_distributed.py, under `accelerate launch --num_processes 2` or as one plain process: distills a tiny
Llama teacher into a 2-layer student for a few steps and writes what the test checks.

    python distributed_train.py OUT MODE PER_DEVICE_BATCH [DEVICE]
    MODE: single, ddp, fsdp1, fsdp2 or zero3; DEVICE: cpu (default) or cuda

Into OUT: `student/` (the trained student, `trainer.save_model`), `logits.safetensors` (the trained student's logits
on a probe batch, from the main process) and `rank<r>.json` per process (its step losses, the teacher's type and
how many teacher parameter elements this process holds, against the teacher's total).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from optimum_agentos.distillation import DistillationConfig, DistillationTrainer, make_student  # noqa: E402
from tests.distillation.test_trainer import lm_data, tiny_llama  # noqa: E402

PROBE = torch.arange(2, 34).reshape(2, 16)
FSDP = {
    "fsdp1": dict(fsdp=True, fsdp_config={"version": 1}),
    "fsdp2": dict(fsdp=True, fsdp_config={"version": 2}),
}
ZERO3 = {  # every parameter partitioned (no persistence threshold); the Trainer fills the other "auto" values
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def local_numel(module: torch.nn.Module) -> int:
    """Teacher elements this process stores: its DTensor shards (FSDP2), its slice of the flat parameter (FSDP1),
    or everything (one process, DDP)."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
            total += p.ds_tensor.numel()
        else:
            total += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return total


def lift_accelerates_cpu_gate(args: DistillationConfig) -> None:
    """accelerate (1.15) turns FSDP on only for accelerator back ends (MULTI_GPU, MULTI_XPU, ...): on CPU processes
    it keeps MULTI_CPU and silently runs DDP. torch's FSDP itself runs on CPU over gloo, so for a CPU test we set up
    accelerate's state as it does on GPUs, before the Trainer builds its Accelerator from it."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    state = Accelerator(cpu=True, fsdp_plugin=plugin).state
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin


def main(out: Path, mode: str, per_device_batch: int, device: str = "cpu") -> None:
    teacher = tiny_llama(layers=4, sharpness=4.0)
    student = make_student(teacher, num_layers=2)
    teacher_total = sum(p.numel() for p in teacher.parameters())
    args = DistillationConfig(
        output_dir=str(out / "trainer"), max_steps=6, per_device_train_batch_size=per_device_batch,
        learning_rate=2e-3, report_to=[], save_strategy="no", use_cpu=device == "cpu", seed=0, disable_tqdm=True,
        lr_scheduler_type="constant", alpha_kd=1.0, dataloader_drop_last=True, logging_steps=1,
        deepspeed=ZERO3 if mode == "zero3" else None, **FSDP.get(mode, {}),
    )
    if mode in FSDP and device == "cpu":
        lift_accelerates_cpu_gate(args)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_data(n=32))
    placed = {"teacher_type": type(trainer.teacher).__name__, "teacher_local_numel": local_numel(trainer.teacher),
              "teacher_device": str(next(trainer.teacher.parameters()).device)}
    trainer.train()
    with torch.no_grad():  # every process joins the forward: FSDP gathers the student's shards
        logits = trainer.model(input_ids=PROBE.to(trainer.accelerator.device)).logits
    trainer.save_model(str(out / "student"))
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    report = {
        **placed, "world_size": world, "teacher_total_numel": teacher_total,
        "teacher_local_numel_after_training": local_numel(trainer.teacher),
        "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
        "loss_parts_step1": {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("loss_")},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if trainer.accelerator.is_main_process:
        save_file({"logits": logits.float().cpu().contiguous()}, str(out / "logits.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
