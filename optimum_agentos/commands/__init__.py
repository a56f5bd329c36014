"""Sub-commands of `optimum-agentos` beyond quantize/prune/distill: eval, card, push, run."""
