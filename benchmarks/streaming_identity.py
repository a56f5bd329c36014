"""SmolLM2 GPTQ int4 g128 in memory versus streamed, both truncated to the first N decoder blocks (the full 30-block
comparison is the `smollm2-gptq-memory` / `-streamed` rows of benchmarks/streaming.py, hours on a shared 2-core
machine): prints whether the two checkpoints hold the same tensors (names, dtypes, values).

    python benchmarks/streaming_identity.py 3 8      # 3 blocks, 8 calibration windows of 512 tokens
"""

import json
import sys

from common import REPO
from streaming import WORK, identical

from optimum_agentos import AgentOSConfig
from optimum_agentos.quantization.quantizer import Quantizer


def main() -> None:
    blocks, windows = int(sys.argv[1]), int(sys.argv[2])
    config = AgentOSConfig(bits=4, group_size=128, method="gptq")
    out = WORK / "identity"
    for streamed in (False, True):
        quantizer = Quantizer.from_pretrained("smollm2-135m", streaming=streamed)
        quantizer.model.model.layers = quantizer.model.model.layers[:blocks]
        quantizer.quantize(out / ("streamed" if streamed else "memory"), config, "wikitext2", num_samples=windows,
                           seq_len=512)
    result = {"blocks": blocks, "windows": windows, "identical": identical(out / "memory", out / "streamed")}
    (REPO / "benchmarks" / "results" / "streaming_identity.json").write_text(json.dumps(result) + "\n")
    print(result)


if __name__ == "__main__":
    main()
