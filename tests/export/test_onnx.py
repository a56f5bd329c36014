"""ONNX export (`export.onnx.write_onnx`): ONNX Runtime, in a fresh process that never imports optimum_agentos, runs
the exported graph (prefill, then decode through its KV cache) with logits within 1e-3 of ours, and
onnxruntime-genai's generation loop picks the same greedy tokens; each quantized layer is a `MatMulNBits` built
from our codes; configurations without an exact form are refused (or re-encoded on request, the error reported)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from optimum_agentos import AgentOSConfig, Quantizer
from optimum_agentos.nn import QuantLinear, SparseLinear
from optimum_agentos.nn.modeling import set_module
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import REPO, build_tiny

pytest.importorskip("onnxruntime_genai")
from optimum_agentos.export.onnx import write_onnx
from optimum_agentos.export.onnx_nbits import NotExportableError

# GroupQueryAttention wants head sizes in multiples of 16: 192 / 4 heads = 48. 192 = 128 + 64 and 320 = 2 * 128 +
# 64 leave a short last group of 128 on every layer, like SmolLM2's 576.
TINY = dict(hidden_size=192, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
            eos_token_id=2)
PROMPT, DECODED = 20, 6  # ONNX Runtime prefills PROMPT tokens, then decodes DECODED more one by one

ORT_SCRIPT = """
import json, sys
import numpy as np, onnxruntime as ort
folder, ids = sys.argv[1], np.array(json.loads(sys.argv[2]), dtype=np.int64)[None]
prompt = int(sys.argv[3])
sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
decoder = json.load(open(folder + "/genai_config.json"))["model"]["decoder"]
empty = np.zeros([1, decoder["num_key_value_heads"], 0, decoder["head_size"]], np.float32)
past = {i.name: empty for i in sess.get_inputs() if i.name.startswith("past")}
outputs = [o.name for o in sess.get_outputs()]
logits, start = [], 0
for end in [prompt] + list(range(prompt + 1, ids.shape[1] + 1)):
    feeds = {"input_ids": ids[:, start:end], "attention_mask": np.ones((1, end), np.int64), **past}
    result = dict(zip(outputs, sess.run(outputs, feeds)))
    logits.append(result["logits"][0])
    past = {name.replace("present", "past_key_values"): v for name, v in result.items() if name.startswith("present")}
    start = end
assert "optimum_agentos" not in sys.modules and "torch" not in sys.modules
np.save(sys.argv[4], np.concatenate(logits))
"""

GENAI_SCRIPT = """
import json, sys
import numpy as np, onnxruntime_genai as og
model = og.Model(sys.argv[1])
prompt = json.loads(sys.argv[2])
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + int(sys.argv[3]), do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.array([prompt], dtype=np.int32))
while not generator.is_done():
    generator.generate_next_token()
assert "optimum_agentos" not in sys.modules and "torch" not in sys.modules
print(json.dumps([int(t) for t in generator.get_sequence(0)]))
"""


def tiny_tokenizer():
    """A word-level tokenizer over the tiny model's 128 ids (t0 ... t127), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", bos_token="t1",
                                                eos_token="t2")


def export(model, folder, **kwargs) -> dict:
    folder.mkdir()
    return write_onnx(model, tiny_tokenizer(), folder, **kwargs)


def ort_logits(folder, ids, tmp_path) -> np.ndarray:
    out = tmp_path / f"logits-{folder.name}.npy"
    _run_script(ORT_SCRIPT, folder, json.dumps(ids.tolist()), str(PROMPT), str(out))
    return np.load(out)


def _run_script(code: str, *args: str) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def relative_error(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(found - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=[
    pytest.param(dict(bits=4, group_size=128), id="int4-g128-untied"),
    pytest.param(dict(bits=8, group_size=-1, sym=True, embedding_bits=8), id="int8-sym-per-row-int8-embeddings-tied"),
])
def exported(request, tmp_path_factory):
    """(our reloaded checkpoint, its ONNX export folder, the export summary) for each configuration."""
    tmp = tmp_path_factory.mktemp("onnx")
    config = AgentOSConfig(**request.param)
    tied = bool(config.embedding_bits)
    Quantizer(build_tiny("llama", **TINY, tie_word_embeddings=tied), tiny_tokenizer()).quantize(tmp / "ckpt", config)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ckpt").eval()  # as users load it: its kernels
    kernels = {type(m.kernel).__name__ for m in model.modules() if isinstance(m, QuantLinear)}
    summary = export(model, tmp / "onnx")
    prepare_kernels(model, policy="reference")  # ours, exactly: dequantize, float32 matmul
    return model, tmp / "onnx", summary, config, kernels


def test_every_quantized_linear_is_matmul_nbits_from_our_codes(exported):
    model, folder, summary, config, kernels = exported
    assert kernels != {"NoneType"}  # exported from the fast kernels' layout (int4: the kernel holds the codes)
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())  # 7 per layer, q/k/v fused into one node
    head = 1 if config.embedding_bits else 0
    assert summary["matmul_nbits"] == quantized - 2 * model.config.num_hidden_layers + head
    # one scale per row of 192 (or 320) inputs: blocks of 64 repeat it
    assert summary["bits"] == [config.bits] and summary["block_sizes"] == [64 if config.group_size == -1 else 128]
    assert summary["requantized"] == {} and summary["added_error"] is None
    assert summary["float_matmuls"] == 1 - head  # the float head, or none when it is int8 too
    if config.embedding_bits:  # tied int8 rows are gathered from the head's codes: no float copy in the file
        assert summary["ops"]["GatherBlockQuantized"] == 1
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(summary["files"])
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"


def test_onnxruntime_logits_match_ours_through_prefill_and_kv_cache_decode(exported, tmp_path):
    model, folder, *_ = exported
    ids = torch.randint(3, 128, (1, PROMPT + DECODED), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].numpy()
    theirs = ort_logits(folder, ids[0], tmp_path)
    assert theirs.shape == ours.shape
    assert relative_error(theirs, ours) < 1e-3


def test_onnxruntime_genai_greedy_tokens_match_ours(exported):
    model, folder, *_ = exported
    prompt = [5, 9, 17, 33, 64, 100, 7]
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0].tolist()
    theirs = json.loads(_run_script(GENAI_SCRIPT, folder, json.dumps(prompt), "8"))
    assert theirs == ours


def test_int3_and_sparse_layers_export_exactly(tmp_path):
    """int3 codes ride in 4-bit storage; a pruned quantized layer is written dense from its codes (pruned
    positions hold the zero point, hence 0.0); per-row int8 (group_size=-1) gets repeated block scales."""
    model = Quantizer(build_tiny("llama", **TINY)).quantize_in_place(AgentOSConfig(bits=3, group_size=64))
    down = model.model.layers[0].mlp.down_proj
    codes, kept = down.codes(), torch.rand(down.out_features, down.in_features) < 0.5
    codes = torch.where(kept, codes, torch.repeat_interleave(down.weight_zero, 64, dim=1)[:, : down.in_features])
    set_module(model, "model.layers.0.mlp.down_proj", SparseLinear.from_codes(
        codes, down.weight_scale, down.weight_zero, kept, None, 3, 64))
    up = model.model.layers[1].mlp.up_proj
    set_module(model, "model.layers.1.mlp.up_proj", QuantLinear.from_float(up.dequantize(), None, 8, -1, sym=False))
    prepare_kernels(model, policy="reference")
    summary = export(model, tmp_path / "onnx")
    assert summary["bits"] == [4, 8] and summary["block_sizes"] == [64]
    ids = torch.randint(3, 128, (1, PROMPT + DECODED), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].numpy()
    assert relative_error(ort_logits(tmp_path / "onnx", ids[0], tmp_path), ours) < 1e-3


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_export_exactly(family, tmp_path):
    """Qwen2 (q/k/v biases, made non-zero here; tied embeddings) and Mistral go through the same route."""
    if family == "qwen2":
        model = build_tiny("qwen2", **TINY)
        for name, module in model.named_modules():
            if name.endswith("_proj") and module.bias is not None:
                torch.nn.init.normal_(module.bias)
    else:
        torch.manual_seed(0)
        config = transformers.MistralConfig(vocab_size=128, num_hidden_layers=2, **TINY)
        model = transformers.MistralForCausalLM(config).eval()
    model = Quantizer(model).quantize_in_place(AgentOSConfig(bits=4, group_size=64))
    prepare_kernels(model, policy="reference")
    assert export(model, tmp_path / "onnx")["matmul_nbits"] == 10
    ids = torch.randint(3, 128, (1, PROMPT + DECODED), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].numpy()
    assert relative_error(ort_logits(tmp_path / "onnx", ids[0], tmp_path), ours) < 1e-3


def test_groups_below_16_are_refused_then_reencoded_on_request(tmp_path):
    model = Quantizer(build_tiny("llama", **TINY)).quantize_in_place(AgentOSConfig(bits=4, group_size=8))
    (tmp_path / "refused").mkdir()
    with pytest.raises(NotExportableError, match=r"groups of 8 .*group_size a power of two >= 16.*requantize=True"):
        write_onnx(model, tiny_tokenizer(), tmp_path / "refused")
    assert list((tmp_path / "refused").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["refused"]  # no build folder left behind either
    summary = export(model, tmp_path / "onnx", requantize=True)
    errors = summary["requantized"]
    assert len(errors) == 14 and summary["block_sizes"] == [16]
    assert 0 < summary["added_error"] == max(errors.values()) < 0.2  # coarser blocks: some error, reported


def test_unsupported_models_are_refused_naming_what_is_supported(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; .*GPT2"):
        write_onnx(build_tiny("gpt2"), tiny_tokenizer(), tmp_path / "out")
    with pytest.raises(ValueError, match="multiple of 16; this model's is 24"):
        write_onnx(build_tiny("llama"), tiny_tokenizer(), tmp_path / "out")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        write_onnx(build_tiny("llama", **TINY), None, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from optimum_agentos import AgentOSConfig, Quantizer
from optimum_agentos.export import onnx
from tests.conftest import build_tiny
from tests.export.test_onnx import TINY, tiny_tokenizer

def die(*args, **kwargs):  # the float folder is written; the builder would run next
    print("killing", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

onnx.run_builder = die
model = Quantizer(build_tiny("llama", **TINY)).quantize_in_place(AgentOSConfig(bits=4, group_size=64))
onnx.write_onnx(model, tiny_tokenizer(), Path(sys.argv[1]))
print("not killed", flush=True)
"""


def test_build_folder_of_a_killed_export_is_removed_by_the_next_one(tmp_path):
    """A SIGKILL skips the removal of the build folder beside the output; the next export removes it (marked, its
    process gone) and leaves a user's folder of the same name (no marker) alone."""
    import signal
    import subprocess
    import sys

    from optimum_agentos.export.onnx import BUILD_MARKER, BUILD_TAG

    (tmp_path / "killed").mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(tmp_path / "killed")], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL and "killing" in proc.stdout, proc.stderr[-3000:]
    [stale] = tmp_path.glob(f"{BUILD_TAG}*")
    assert (stale / BUILD_MARKER).is_file() and (stale / "float" / "model.safetensors").is_file()
    users = tmp_path / f"{BUILD_TAG}{stale.name[len(BUILD_TAG):].split('-')[0]}-mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")

    model = Quantizer(build_tiny("llama", **TINY)).quantize_in_place(AgentOSConfig(bits=4, group_size=64))
    assert export(model, tmp_path / "onnx")["matmul_nbits"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["killed", "onnx", users.name])
    assert (users / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.model("smollm2-135m")
def test_smollm2_int4_export_matches_ours_in_onnxruntime_and_genai(tmp_path):
    """The real SmolLM2-135M-Instruct, int4 group 128 (ragged last group of 64 on its 576 inputs), tied float
    embeddings: onnxruntime's logits within 1e-3 of ours through prefill and decode, the same greedy tokens."""
    from transformers import AutoTokenizer

    from optimum_agentos.models import resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = Quantizer.from_pretrained(source).quantize_in_place(AgentOSConfig(bits=4, group_size=128))
    prepare_kernels(model, policy="reference")
    (tmp_path / "onnx").mkdir()
    summary = write_onnx(model, tokenizer, tmp_path / "onnx")
    assert summary["matmul_nbits"] == 30 * 5 and summary["block_sizes"] == [128]  # q/k/v fused per layer
    prompt = tokenizer("The history of the city begins with", return_tensors="pt").input_ids
    ids = torch.cat([prompt, torch.randint(0, 49152, (1, PROMPT + DECODED - prompt.shape[1]),
                                           generator=torch.Generator().manual_seed(5))], dim=1)
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].numpy()
        greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    assert relative_error(ort_logits(tmp_path / "onnx", ids[0], tmp_path), ours) < 1e-3
    assert json.loads(_run_script(GENAI_SCRIPT, tmp_path / "onnx", json.dumps(prompt[0].tolist()), "8")) == greedy
