"""Glue with the rest of the HF stack: transformers quantizer registration, PEFT dispatch, optimum-cli."""
