"""Device names users pass (`device="cpu" | "cuda" | "auto"`), checked before anything moves."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`"cpu"`, `"cuda"` (or `"cuda:N"`, any torch device) or `"auto"` (the accelerator when there is one)."""
    if device is None or device == "cpu":
        return torch.device("cpu")
    if device == "auto":
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if accelerator is not None and torch.accelerator.is_available():
            return torch.device(accelerator.type)
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device name; use 'cpu', 'cuda', 'cuda:1' or 'auto'.") from err
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", lambda: False)()
    count = getattr(module, "device_count", lambda: 1)() if available else 0
    if not available or (device.index is not None and device.index >= count):
        raise ValueError(
            f"device={str(device)!r} is not available on this machine (torch {torch.__version__} sees "
            f"{count} {device.type} device(s)). Use device='cpu', or device='auto' to take an accelerator only when "
            "there is one."
        )
    return device
