"""Students made from their teacher: a copy with fewer layers (DistilBERT-style initialization)."""

from __future__ import annotations

import copy

import torch.nn as nn

from ..nn.modeling import find_layer_list, keep_layers


def uniform_layer_selection(teacher_layers: int, num_layers: int) -> list[int]:
    """Evenly spaced teacher layers starting at the first: every other one when halving (DistilBERT: 0, 2, 4, ...)."""
    if not 0 < num_layers <= teacher_layers:
        raise ValueError(f"num_layers must be between 1 and the teacher's {teacher_layers} layers (got {num_layers}).")
    return [i * teacher_layers // num_layers for i in range(num_layers)]


def make_student(teacher: nn.Module, num_layers: int | None = None, layers: list[int] | None = None) -> nn.Module:
    """A student that copies the teacher with only some of its layers: embeddings, heads and the kept layers start
    from the teacher's weights (Sanh et al. 2019). The teacher is left untouched.

    Args:
        teacher (`PreTrainedModel`): any transformers model keeping its layers in one `nn.ModuleList`
            (BERT-style encoders, Llama-style decoders, ...).
        num_layers (`int`, *optional*): how many layers to keep, evenly spaced from the first (every other one
            when halving).
        layers (`list[int]`, *optional*): exactly which teacher layers to keep, in order; overrides `num_layers`.

    Example:

    ```python
    >>> student = make_student(teacher, num_layers=3)   # a 6-layer MiniLM -> teacher layers 0, 2, 4
    ```
    """
    if teacher.__class__.__name__.startswith("Peft"):
        raise TypeError("make_student takes the base transformers model; pass peft_model.get_base_model() instead.")
    _, teacher_layers = find_layer_list(teacher)
    if layers is None:
        if num_layers is None:
            raise ValueError("Pass num_layers (evenly spaced selection) or layers (explicit teacher layer indices).")
        layers = uniform_layer_selection(len(teacher_layers), num_layers)
    student = copy.deepcopy(teacher)  # the config too, shared by reference inside the copy as in the teacher
    keep_layers(student, list(layers))
    student.config.agentos_student_of_layers = list(layers)  # lineage, saved in config.json
    return student
