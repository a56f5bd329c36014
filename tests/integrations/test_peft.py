"""QLoRA-style LoRA over QuantLinear with the real PEFT: training, saving adapters, merging back."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.nn import qmath as rtn

from ..conftest import model_output, sample_ids


@pytest.fixture
def quantized(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(bits=4, group_size=64))


def train(model, ids, steps=25, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_over_quantlinear_and_base_stays_frozen(quantized):
    base_before = {n: p.clone() for n, p in quantized.named_parameters()}
    model = get_peft_model(quantized, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.get_base_layer(), QuantLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    losses = train(model, sample_ids(4, 32))
    assert losses[-1] < 0.9 * losses[0]
    for name, param in model.base_model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), name


def test_adapter_save_and_reload(quantized, tiny_folder, tmp_path):
    model = get_peft_model(quantized, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))
    ids = sample_ids(4, 32)
    train(model, ids, steps=5)
    model.eval()
    expected = model_output(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(bits=4, group_size=64))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(model_output(reloaded, ids), expected)


def test_merge_and_unload_requantizes_base_plus_delta(quantized):
    model = get_peft_model(quantized, LoraConfig(r=8, target_modules=["q_proj"], lora_dropout=0.0))
    train(model, sample_ids(4, 32), steps=10)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    target = layer.get_base_layer().dequantize(torch.float32) + layer.get_delta_weight("default").detach()
    merged = model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear)
    # Requantized with RTN: every merged weight is within one quantization step of base + delta.
    step = rtn.expand_groups(q_proj.weight_scale.float(), q_proj.in_features, q_proj.group_size)
    assert ((q_proj.dequantize(torch.float32) - target).abs() <= step + 1e-6).all()
