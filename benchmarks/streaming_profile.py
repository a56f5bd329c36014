"""Where the peak memory of streamed GPTQ goes: the process's peak resident memory (`ru_maxrss`, exact, no sampling
gap) read when each phase starts and ends, so every rise of the peak is charged to the phase it happened in.

Phases: imports, open (skeleton + tokenizer), calib-data, capture (embeddings and the first block's inputs),
load (a block's weights), stats (a block's Hessian accumulation), solve (one layer's GPTQ), write (a block's state into the shard writer), flush (a shard written), rest (embeddings/head
at the end), finish.

    python benchmarks/streaming_profile.py --blocks 3 --windows 8            # SmolLM2, first 3 blocks
    python benchmarks/streaming_profile.py --synth --blocks 1 --windows 4    # the synthetic 2.07B Llama
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import contextmanager


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RISES: dict[str, float] = {}  # phase -> MiB the peak rose while it ran
EVENTS: list[tuple] = []


@contextmanager
def phase(name: str):
    before, rss_before = peak_mib(), rss_mib()
    try:
        yield
    finally:
        after = peak_mib()
        if after > before:
            RISES[name] = RISES.get(name, 0.0) + after - before
        EVENTS.append((name, round(rss_before), round(rss_mib()), round(after)))


def wrap(owner, attr: str, name: str) -> None:
    original = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        with phase(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synth", action="store_true")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--buffer-memory", default="64MB")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    with phase("imports"):
        import torch

        from optimum_agentos import AgentOSConfig
        from optimum_agentos.calibration import runner
        from optimum_agentos.quantization import gptq, quantizer as quantizer_module
        from optimum_agentos.quantization.quantizer import Quantizer
        from optimum_agentos.streaming import pipeline, writer

    wrap(runner, "capture_block_inputs", "capture")
    wrap(runner, "collect_input_stats", "stats")
    wrap(quantizer_module, "gptq_quantize", "solve")
    wrap(pipeline.StreamedModel, "load", "load")
    wrap(Quantizer, "calibration_ids", "calib-data")
    wrap(pipeline.BlockStream, "done_block", "write")
    wrap(pipeline.BlockStream, "load_rest", "rest")
    wrap(writer.ShardWriter, "flush", "flush")
    wrap(writer.ShardWriter, "finish", "finish")

    torch.manual_seed(0)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    with phase("open"):
        if args.synth:
            from streaming import SYNTH, synthetic_checkpoint
            from transformers import AutoTokenizer

            from optimum_agentos.data import calibration_windows
            from optimum_agentos.models import resolve_model

            source = synthetic_checkpoint()
            tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
            ids = calibration_windows(tokenizer, "wikitext2", "validation", args.windows, 512) % SYNTH["vocab_size"]
            del tokenizer
            quantizer = Quantizer.from_pretrained(str(source), streaming=True)
            data = ids
        else:
            quantizer = Quantizer.from_pretrained("smollm2-135m", streaming=True)
            data = "wikitext2"
        quantizer.model.model.layers = quantizer.model.model.layers[: args.blocks]
    base = rss_mib()
    from streaming import WORK

    with phase("quantize"):
        quantizer.quantize(WORK / "profile", AgentOSConfig(bits=4, group_size=128, method="gptq"), data,
                           num_samples=args.windows, seq_len=512, buffer_memory=args.buffer_memory)
    result = {"model": "synth" if args.synth else "smollm2", "blocks": args.blocks, "windows": args.windows,
              "base_rss_mib": round(base), "peak_rss_mib": round(peak_mib()), "seconds": time.perf_counter() - start,
              "peak_rises_mib": {k: round(v) for k, v in RISES.items()}, "events": EVENTS}
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    for event in EVENTS:
        print("%-10s rss %5d -> %5d  peak %5d" % event)
    if args.out:
        open(args.out, "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
