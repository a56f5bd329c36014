"""GPTQ int4 of the embedded SmolLM2-135M-Instruct, then reload it with plain transformers and generate.

    python examples/quantize_smollm2.py --output smollm2-int4
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_agentos  # noqa: F401  (registers quant_method "agentos")
from optimum_agentos import AgentOSConfig, Quantizer
from optimum_agentos.evaluation import perplexity


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="smollm2-int4")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()

    quantizer = Quantizer.from_pretrained("smollm2-135m")
    quantizer.quantize(
        save_dir=args.output,
        config=AgentOSConfig(bits=4, group_size=args.group_size, method="gptq"),
        calibration_dataset="wikitext2",
    )
    model = AutoModelForCausalLM.from_pretrained(args.output)
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    print("WikiText-2 perplexity (8 x 512):", perplexity(model, tokenizer, num_windows=8))
    prompt = tokenizer("The three primary colors are", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
