"""Distillation losses as pure functions on tensors (no trainer, no hooks), each tested alone.

All losses average over the selected positions (a token, or a sequence for classification) and the soft-label
losses are multiplied by `temperature ** 2` (Hinton et al. 2015), so their gradients keep the same scale as the
hard-label loss whatever the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def _divergence_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str, beta: float):
    """Per-row divergence of two `[rows, classes]` logit blocks, summed over the rows (float32 inside)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":  # KL(teacher || student): mean-seeking, the classic KD loss
        return F.kl_div(s, t, reduction="sum", log_target=True)
    if kind == "reverse_kl":  # KL(student || teacher): mode-seeking (MiniLLM)
        return F.kl_div(t, s, reduction="sum", log_target=True)
    # generalized Jensen-Shannon (GKD, Agarwal et al. 2024): beta KL(t || m) + (1 - beta) KL(s || m)
    log_beta, log_rest = torch.log(torch.tensor(beta)), torch.log(torch.tensor(1 - beta))
    m = torch.logsumexp(torch.stack([t + log_beta, s + log_rest]), dim=0)
    return beta * F.kl_div(m, t, reduction="sum", log_target=True) + (1 - beta) * F.kl_div(
        m, s, reduction="sum", log_target=True
    )


def _flatten_selected(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat
    return flat[mask.reshape(-1).to(torch.bool)]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    chunk_size: int | None = 1024,
) -> torch.Tensor:
    """Soft-label loss between student and teacher logits of shape `[..., classes]`.

    Args:
        student_logits (`torch.Tensor`): `[batch, (seq,) classes]`, with grad.
        teacher_logits (`torch.Tensor`): the same shape, no grad needed.
        mask (`torch.Tensor`, *optional*): `[batch, (seq)]`, true where the position counts (padding and ignored
            labels false).
        temperature (`float`, *optional*, defaults to `1.0`): softens both distributions.
        kind (`str`, *optional*, defaults to `"forward_kl"`): `"forward_kl"`, `"reverse_kl"` or `"jsd"`.
        beta (`float`, *optional*, defaults to `0.5`): the teacher's weight in the `"jsd"` mixture.
        chunk_size (`int`, *optional*, defaults to `1024`): rows handled at once. Each chunk is recomputed in the
            backward pass (activation checkpointing), so memory holds one chunk's `[rows, vocab]` float32 temporaries
            instead of the whole sequence's; `None` does all rows at once.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"Student and teacher logits differ in size ({student_logits.shape[-1]} vs {teacher_logits.shape[-1]}): "
            "distillation needs the same vocabulary or label set."
        )
    if kind not in KD_LOSSES:
        raise ValueError(f"Unknown KD loss {kind!r}; choose one of {KD_LOSSES}.")
    student = _flatten_selected(student_logits, mask)
    teacher = _flatten_selected(teacher_logits, mask).detach()
    rows = student.shape[0]
    if rows == 0:
        return student_logits.sum() * 0.0
    chunk = rows if not chunk_size else chunk_size
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, chunk):
        s, t = student[start : start + chunk], teacher[start : start + chunk]
        if s.requires_grad and chunk < rows:
            total = total + checkpoint(_divergence_rows, s, t, temperature, kind, beta, use_reentrant=False)
        else:
            total = total + _divergence_rows(s, t, temperature, kind, beta)
    return total / rows * temperature**2


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = 1024,
) -> torch.Tensor:
    """Forward KL against a teacher known only by its top-k logits (a precomputed cache).

    The teacher distribution is the softmax of its top-k logits at `temperature` (renormalized over those k); the
    student keeps its full softmax, so mass it puts outside the teacher's top k is penalized through the k terms.

    Args:
        student_logits (`torch.Tensor`): `[batch, (seq,) vocab]`.
        teacher_topk_logits (`torch.Tensor`): `[batch, (seq,) k]`.
        teacher_topk_indices (`torch.Tensor`): `[batch, (seq,) k]`, indices into the vocabulary.
        mask (`torch.Tensor`, *optional*): `[batch, (seq)]`, true where the position counts.
        temperature (`float`, *optional*, defaults to `1.0`): softens both distributions.
        chunk_size (`int`, *optional*, defaults to `1024`): rows per chunk, as in `distillation_loss`.
    """
    if teacher_topk_indices.max() >= student_logits.shape[-1]:
        raise ValueError(
            f"The cached teacher indices reach {int(teacher_topk_indices.max())} but the student has "
            f"{student_logits.shape[-1]} logits: the cache was made with another vocabulary."
        )
    student = _flatten_selected(student_logits, mask)
    values = _flatten_selected(teacher_topk_logits, mask).detach().float()
    indices = _flatten_selected(teacher_topk_indices, mask).long()
    rows = student.shape[0]
    if rows == 0:
        return student_logits.sum() * 0.0

    def rows_loss(s, v, i):
        log_q = F.log_softmax(s.float() / temperature, dim=-1).gather(-1, i)
        log_p = F.log_softmax(v / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum()

    chunk = rows if not chunk_size else chunk_size
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, chunk):
        part = (student[start : start + chunk], values[start : start + chunk], indices[start : start + chunk])
        if part[0].requires_grad and chunk < rows:
            total = total + checkpoint(rows_loss, *part, use_reentrant=False)
        else:
            total = total + rows_loss(*part)
    return total / rows * temperature**2


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    layer_map: dict[int, int],
    mask: torch.Tensor | None = None,
    kind: str = "mse",
) -> torch.Tensor:
    """Mean over mapped layers of the distance between student and teacher hidden states.

    `layer_map` maps indices of `output_hidden_states` (0 = embeddings, i = after layer i) from student to teacher.
    `kind` is `"mse"` (mean squared error per element) or `"cosine"` (1 - cosine similarity per position).
    """
    losses = []
    for s_idx, t_idx in layer_map.items():
        s, t = student_hidden[s_idx], teacher_hidden[t_idx].detach()
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"Hidden sizes differ (student {s.shape[-1]}, teacher {t.shape[-1]}): the hidden-state loss needs "
                "the same width; use a student made by make_student, or set hidden_loss_weight=0."
            )
        s, t = _flatten_selected(s.float(), mask), _flatten_selected(t.float(), mask)
        if kind == "mse":
            losses.append(F.mse_loss(s, t))
        elif kind == "cosine":
            losses.append((1 - F.cosine_similarity(s, t, dim=-1)).mean())
        else:
            raise ValueError(f"Unknown hidden-state loss {kind!r}; choose 'mse' or 'cosine'.")
    return torch.stack(losses).mean()


def attention_loss(
    student_attentions: tuple[torch.Tensor, ...],
    teacher_attentions: tuple[torch.Tensor, ...],
    layer_map: dict[int, int],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) between attention maps of mapped layers (MiniLM, Wang et al. 2020), averaged over
    heads and query positions.

    `layer_map` uses layer indices (0-based, into the attentions tuple). Needs the same number of heads.
    `mask` (`[batch, seq]`) selects the query positions that count; padded keys carry zero attention already.
    """
    losses = []
    for s_idx, t_idx in layer_map.items():
        s, t = student_attentions[s_idx], teacher_attentions[t_idx].detach()
        if s.shape != t.shape:
            raise ValueError(
                f"Attention maps differ in shape (student layer {s_idx}: {tuple(s.shape)}, teacher layer {t_idx}: "
                f"{tuple(t.shape)}); the attention loss needs the same number of heads."
            )
        s, t = s.float().clamp_min(1e-12).log(), t.float().clamp_min(1e-12).log()  # [batch, heads, q, k]
        per_query = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # [batch, heads, q]
        if mask is not None:
            keep = mask.to(torch.bool)[:, None, :].expand_as(per_query)
            per_query = per_query[keep]
        losses.append(per_query.mean())
    return torch.stack(losses).mean()
