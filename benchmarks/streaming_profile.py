"""Where the peak memory of streamed GPTQ goes: the kernel's resident high-water mark (`VmHWM`, exact, no sampling
gap) is reset when a phase starts (`/proc/self/clear_refs`) and read when it ends, so each phase gets its own true
peak; the run's peak is the largest of them (and of the gaps between phases). Linux only.

Phases: imports, open (skeleton + tokenizer), calib-data (tokenizing), capture (embedding rows and the first
block's inputs), load (tensors read), stats (a block's Hessian accumulation), invert (a Hessian's inverse factor),
solve (one layer's GPTQ), write (a block's state to its part file), flush (a part file written), rest-pieces /
rest-load (the tensors outside the blocks), finish (parts joined into shards).

    python benchmarks/streaming_profile.py --blocks 3 --windows 8            # SmolLM2, first 3 blocks
    python benchmarks/streaming_profile.py --synth --blocks 1 --windows 16   # the synthetic 2.07B Llama
    python benchmarks/streaming_profile.py --folder path/to/checkpoint --blocks 2 --windows 8   # random ids
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


PEAKS: dict[str, float] = {}  # phase -> its highest resident memory (MiB), over all its calls
EVENTS: list[tuple] = []
_OPEN: list[list] = []  # the phases running now (nested), each [name, peak so far]
_RUN_PEAK = [0.0]


def hwm_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def _collect() -> None:
    """Charge the high-water mark since the last reset to every open phase and to the run, then reset it."""
    high = hwm_mib()
    for entry in _OPEN:
        entry[1] = max(entry[1], high)
    _RUN_PEAK[0] = max(_RUN_PEAK[0], high)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


@contextmanager
def phase(name: str):
    _collect()
    rss_before = rss_mib()
    _OPEN.append([name, rss_before])
    try:
        yield
    finally:
        _collect()
        _, peak = _OPEN.pop()
        PEAKS[name] = max(PEAKS.get(name, 0.0), peak)
        EVENTS.append((name, round(rss_before), round(rss_mib()), round(peak)))


def wrap(owner, attr: str, name: str) -> None:
    original = getattr(owner, attr, None)
    if original is None:  # an older tree without this step
        return

    def wrapped(*args, **kwargs):
        with phase(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synth", action="store_true")
    parser.add_argument("--folder", default=None, help="Any float checkpoint folder, calibrated on random token ids.")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--buffer-memory", default="64MB")
    parser.add_argument("--batch-size", type=int, default=4)
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
    wrap(pipeline.BlockStream, "load_rest", "rest-load")
    wrap(writer.ShardWriter, "flush", "flush")
    wrap(writer.ShardWriter, "finish", "finish")
    wrap(quantizer_module, "invert_hessian", "invert")
    wrap(pipeline, "_write_rest_in_pieces", "rest-pieces")

    torch.manual_seed(0)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    with phase("open"):
        if args.folder:
            quantizer = Quantizer.from_pretrained(args.folder, streaming=True)
            vocab = quantizer.model.config.vocab_size
            data = torch.randint(0, vocab, (args.windows, 512), generator=torch.Generator().manual_seed(0))
        elif args.synth:
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
                           num_samples=args.windows, seq_len=512, buffer_memory=args.buffer_memory,
                           batch_size=args.batch_size)
    _collect()
    result = {"model": args.folder or ("synth" if args.synth else "smollm2"), "blocks": args.blocks, "windows": args.windows,
              "base_rss_mib": round(base), "peak_rss_mib": round(_RUN_PEAK[0]), "seconds": time.perf_counter() - start,
              "phase_peaks_mib": {k: round(v) for k, v in PEAKS.items()}, "events": EVENTS}
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    for event in EVENTS:
        print("%-10s rss %5d -> %5d  phase peak %5d" % event)
    if args.out:
        open(args.out, "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
