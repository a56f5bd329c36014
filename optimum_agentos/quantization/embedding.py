"""int8 token embeddings and output head for a float model (`AgentOSConfig(embedding_bits=8)`).

The layer types are the runtime's (`optimum_agentos.nn.embedding`); they are re-exported here for earlier imports."""

from __future__ import annotations

from torch import nn

from ..nn.embedding import EMBEDDING_BITS, QuantEmbedding, QuantHead, quantize_rows_int8  # noqa: F401


def quantize_embeddings(model: nn.Module) -> None:
    """Replace the float input embedding (and the output head, sharing its tensors when tied) of a float model by
    int8 ones, in place."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"embedding_bits needs an nn.Embedding input embedding; {type(model).__name__} has "
                         f"{type(embedding).__name__}. Leave embedding_bits=None for this model.")
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    new_embedding = QuantEmbedding.from_float(embedding)
    model.set_input_embeddings(new_embedding)
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(QuantHead.tied_to(new_embedding) if tied else QuantHead.from_float(head))
