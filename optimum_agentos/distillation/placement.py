"""Where the frozen teacher lives in a distributed run: laid out like the student, never seen by the optimizer.

The Trainer's accelerator decides; the teacher follows it:

- one process or DDP: a plain eval module on every process's device (or where `from_pretrained(device_map=...)`
  put it). It has no gradients, so there is nothing to synchronize and no `DistributedDataParallel` wrapper.
- FSDP2 (`fsdp_config={"version": 2}`, the default): `fully_shard` through accelerate's own FSDP2 preparation (same
  wrap policy, mixed-precision and offload settings as the student), then told to re-shard after every forward:
  the teacher never runs a backward, which is where FSDP would otherwise free the units it keeps gathered.
- FSDP1 (deprecated in transformers): `FullyShardedDataParallel` with the plugin's settings.
- DeepSpeed: `deepspeed.initialize` without optimizer or scheduler. ZeRO-3 partitions the teacher's parameters
  across processes; the other stages do not shard parameters, so the teacher runs there as stage 0 (replicated).

The teacher is not registered with the accelerator (`accelerator._models`): checkpoints and `evaluate()` see the
student only.
"""

from __future__ import annotations

import copy

import torch.nn as nn
from accelerate.utils import DistributedType


def prepare_teacher(accelerator, teacher: nn.Module) -> nn.Module:
    """Freeze `teacher` (eval mode, no gradients) and place it the way `accelerator` places the student."""
    teacher.eval()
    teacher.requires_grad_(False)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return _deepspeed(accelerator, teacher)
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        # Preparing a model resolves the plugin's wrap policy against that model's layer classes; the student,
        # prepared later by the Trainer, must resolve it against its own.
        saved = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
        try:
            teacher = _fsdp2(accelerator, teacher) if plugin.fsdp_version == 2 else _fsdp1(accelerator, teacher)
        finally:
            plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved
        return teacher.eval()
    if getattr(teacher, "hf_device_map", None):  # placed by from_pretrained(device_map=...): leave it where it is
        return teacher
    return teacher.to(accelerator.device)


def _fsdp2(accelerator, teacher: nn.Module) -> nn.Module:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    teacher = fsdp2_prepare_model(accelerator, teacher)
    teacher.set_reshard_after_forward(True)  # no backward will free the gathered weights: free them after forward
    return teacher


def _fsdp1(accelerator, teacher: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(teacher)
    return FullyShardedDataParallel(
        teacher,
        sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=plugin.sync_module_states,
        forward_prefetch=plugin.forward_prefetch,
        use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=accelerator.device,
    )


def teacher_deepspeed_config(config: dict, hidden_size: int | None) -> dict:
    """The training DeepSpeed config turned into the teacher's: no optimizer or scheduler; ZeRO-3 kept (with its
    model-dependent "auto" sizes filled from `hidden_size`, as the Trainer fills the student's), any other stage
    replaced by stage 0, since only ZeRO-3 partitions parameters."""
    config = copy.deepcopy(config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
        return config
    sizes = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, size in sizes.items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise ValueError(
                    f"The DeepSpeed config sets zero_optimization.{key}='auto' and the teacher's config has no "
                    "hidden_size to size it from; give it a number in the DeepSpeed config."
                )
            zero[key] = size(hidden_size)
    return config


def _deepspeed(accelerator, teacher: nn.Module) -> nn.Module:
    import deepspeed

    config = teacher_deepspeed_config(
        accelerator.state.deepspeed_plugin.deepspeed_config, getattr(getattr(teacher, "config", None), "hidden_size", None)
    )
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
