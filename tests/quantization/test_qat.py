"""Quantization-aware training: straight-through gradients, the fake-quantized forward against the agentos layer,
training with `Trainer` and `DistillationTrainer`, and the converted checkpoint reloaded in a fresh process."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from optimum_agentos import AgentOSConfig
from optimum_agentos.data import load_text
from optimum_agentos.distillation import DistillationConfig, DistillationTrainer
from optimum_agentos.formats.mark import mark_compressed
from optimum_agentos.nn.linear import QuantLinear
from optimum_agentos.nn.prepare import prepare_kernels
from optimum_agentos.nn.qmath import dequantize_codes, group_qparams, quantize_codes
from optimum_agentos.nn.sparse_linear import SparseLinear
from optimum_agentos.quantization.fake_quant import FakeQuantLinear, fake_quantize
from optimum_agentos.quantization.qat import QATCallback, convert_qat, prepare_qat, qat_layers
from optimum_agentos.quantization.rtn import quantize_model_rtn

from ..conftest import build_tiny, model_output, run_python, sample_ids


def _weight_and_grid(shape=(8, 96), group_size=64, shrink=1.0, bits=4, sym=False):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    scales, zeros = group_qparams(w, bits, group_size, sym)
    return w, (scales.float() * shrink).to(torch.float16), zeros


@pytest.mark.parametrize("sym", [False, True])
def test_fake_quantize_forward_is_the_stored_weight(sym):
    """The forward value is exactly what the packed codes dequantize to (short last group included: 96 = 64 + 32)."""
    w, scales, zeros = _weight_and_grid(sym=sym)
    codes = quantize_codes(w, scales, zeros, 4, 64)
    assert torch.equal(fake_quantize(w, scales, zeros, 4, 64), dequantize_codes(codes, scales, zeros, 64))


def test_ste_gradient_passes_where_not_clipped():
    """Halving the scales clips the largest weights: their gradient is 0, every other weight gets the upstream
    gradient unchanged."""
    w, scales, zeros = _weight_and_grid(shrink=0.5)
    w.requires_grad_(True)
    upstream = torch.randn(w.shape)
    (fake_quantize(w, scales, zeros, 4, 64) * upstream).sum().backward()
    scale = scales.float().repeat_interleave(64, dim=1)[:, :96]
    zero = zeros.float().repeat_interleave(64, dim=1)[:, :96]
    code = torch.round(w.detach() / scale) + zero
    inside = (code >= 0) & (code <= 15)
    assert 0 < int((~inside).sum()) < w.numel()  # some weights are clipped, most are not
    assert torch.equal(w.grad[inside], upstream[inside])
    assert torch.all(w.grad[~inside] == 0)


def test_learned_scale_gradient_holds_codes_fixed():
    """With trainable scales, their gradient is autograd's through `(codes - zero) * scale` with the codes fixed;
    the weights' gradient stays the clipped straight-through one."""
    w, scales, zeros = _weight_and_grid(group_size=32, shape=(4, 64), shrink=0.7)
    s = scales.float().requires_grad_(True)
    upstream = torch.randn(w.shape)
    (fake_quantize(w, s, zeros, 4, 32, torch.float16) * upstream).sum().backward()
    s_ref = scales.float().requires_grad_(True)
    codes = quantize_codes(w, scales, zeros, 4, 32).float()
    zero = zeros.float().repeat_interleave(32, dim=1)
    ((codes - zero) * s_ref.repeat_interleave(32, dim=1) * upstream).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-5)
    assert s.grad.abs().min() > 0  # weights on their grid points (the start of QAT) still move the scales


def _quantized_tiny(group_size=64):
    model = build_tiny("llama")
    config = AgentOSConfig(bits=4, group_size=group_size)
    quantize_model_rtn(model, config)
    mark_compressed(model, config)
    return model


def test_prepared_forward_equals_agentos_layers():
    """Before training the fake-quantized model computes exactly what the agentos layers' reference path computes,
    and within the int4 kernel's bf16 tolerance of its default path."""
    model = _quantized_tiny()
    ids = sample_ids()
    auto = model_output(model, ids)
    prepare_kernels(model, policy="reference")
    reference = model_output(model, ids)
    prepare_qat(model)
    assert len(qat_layers(model)) == 14 and not any(isinstance(m, QuantLinear) for m in model.modules())
    fake = model_output(model, ids)
    assert torch.equal(fake, reference)
    assert (fake - auto).abs().max() <= 0.02 * auto.abs().max()  # bf16 activations and scales in the kernel


def _text_batches(n_windows=24, seq_len=32):
    """Real text (WikiText-2 validation) as bytes folded into the tiny models' 128-token vocabulary."""
    data = torch.tensor(list(load_text("wikitext2", "validation")[:20000].encode("ascii", "ignore")[: n_windows * seq_len]))
    ids = (data % 128).view(n_windows, seq_len)
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, steps, cls=TrainingArguments, lr=3e-3, **extra):
    return cls(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
               lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0,
               logging_steps=1, disable_tqdm=True, **extra)


def _mean_loss(model, batches):
    with torch.no_grad():
        return sum(float(model(input_ids=b["input_ids"][None], labels=b["labels"][None]).loss) for b in batches) / len(batches)


@pytest.mark.data
@pytest.mark.parametrize("scale_mode", ["frozen", "learned", "minmax"])
def test_trainer_qat_then_reload_in_fresh_process(tmp_path, scale_mode):
    """From an agentos checkpoint loaded with from_pretrained: a few Trainer steps on real text lower the loss,
    QATCallback converts at the end, and the saved checkpoint reloads in a fresh process with identical logits."""
    from transformers import AutoModelForCausalLM

    start = tmp_path / "start"
    _quantized_tiny().save_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start)
    batches = _text_batches()
    held_out = batches[-4:]
    before = _mean_loss(model, held_out)
    prepare_qat(model, scale_mode=scale_mode)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n or ".mlp." in n for n in trainable)  # embeddings, norms frozen
    trainer = Trainer(model=model, args=_args(tmp_path, 12), train_dataset=batches[:-4], callbacks=[QATCallback()])
    trainer.train()
    assert not qat_layers(model) and model.is_quantized  # converted by the callback
    after = _mean_loss(model, held_out)
    assert after < before - 0.05, (before, after)
    trainer.save_model(str(tmp_path / "qat"))  # the Trainer's own save writes the agentos checkpoint
    ids = sample_ids()
    torch.save(model_output(model, ids), tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    out = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        from optimum_agentos.nn.linear import QuantLinear
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'qat')!r}).eval()
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        with torch.no_grad():
            logits = model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
        print(model.config.quantization_config.format_version)
    """)
    assert out.strip() == "1"  # a plain int4 checkpoint: the same format as the start


@pytest.mark.data
def test_distillation_trainer_qat_from_float_model(tmp_path):
    """prepare_qat(float model, config) starts from round to nearest; DistillationTrainer (teacher: the float model)
    trains it; convert_qat packs codes whose dequantized weights are exactly the trained fake-quantized ones."""
    teacher = build_tiny("llama", initializer_range=0.1)  # peaked outputs: the rounding costs a visible KL
    student = copy.deepcopy(teacher)
    prepare_qat(student, AgentOSConfig(bits=4, group_size=64), scale_mode="learned")
    batches = _text_batches()
    kd_before = _kd(student, teacher, batches[-4:])
    args = _args(tmp_path, 10, DistillationConfig, lr=1e-4, alpha_kd=1.0, temperature=1.0)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=batches[:-4]).train()
    assert _kd(student, teacher, batches[-4:]) < 0.9 * kd_before
    fake = {n: m.fake_weight().detach() for n, m in qat_layers(student).items()}
    convert_qat(student)
    for name, weight in fake.items():
        layer = student.get_submodule(name)
        assert isinstance(layer, QuantLinear) and torch.equal(layer.dequantize(torch.float32), weight)


def _kd(student, teacher, batches):
    with torch.no_grad():
        total = 0.0
        for b in batches:
            s = torch.log_softmax(student(input_ids=b["input_ids"][None]).logits, -1)
            t = torch.log_softmax(teacher(input_ids=b["input_ids"][None]).logits, -1)
            total += float((t.exp() * (t - s)).sum(-1).mean())
    return total / len(batches)


def test_errors_name_the_problem_and_fix(tmp_path):
    with pytest.raises(ValueError, match="no agentos quantized layers.*config=AgentOSConfig"):
        prepare_qat(build_tiny("llama"))
    with pytest.raises(ValueError, match="starts from round to nearest.*Quantizer"):
        prepare_qat(build_tiny("llama"), AgentOSConfig(method="gptq"))
    with pytest.raises(ValueError, match="already agentos-quantized"):
        prepare_qat(_quantized_tiny(), AgentOSConfig(bits=4, group_size=64))
    with pytest.raises(ValueError, match="scale_mode='lsq' is not supported"):
        prepare_qat(_quantized_tiny(), scale_mode="lsq")
    w8a8 = build_tiny("llama")
    config = AgentOSConfig(bits=8, group_size=-1, activations="int8-dynamic")
    quantize_model_rtn(w8a8, config)
    mark_compressed(w8a8, config)
    with pytest.raises(ValueError, match="activations='int8-dynamic'"):
        prepare_qat(w8a8)
    pruned = _quantized_tiny()
    dense = pruned.model.layers[0].mlp.down_proj
    kept = torch.rand(dense.out_features, dense.in_features) > 0.5
    pruned.model.layers[0].mlp.down_proj = SparseLinear.from_codes(dense.codes(), dense.weight_scale,
                                                                   dense.weight_zero, kept, None, 4, 64)
    with pytest.raises(ValueError, match="pruned \\(sparse\\) layers"):
        prepare_qat(pruned)
    prepared = prepare_qat(_quantized_tiny())
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(prepared)
    with pytest.raises(ValueError, match="no fake-quantized layers to convert"):
        convert_qat(_quantized_tiny())
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT model"):
        prepare_qat(peft_model)
    trainer = Trainer(model=build_tiny("llama"), args=_args(tmp_path, 1), train_dataset=[{"input_ids": torch.ones(8, dtype=torch.long), "labels": torch.ones(8, dtype=torch.long)}] * 4, callbacks=[QATCallback()])
    with pytest.raises(ValueError, match="call prepare_qat"):
        trainer.train()


def test_fake_quant_layer_state_dict():
    """A Trainer checkpoint saved mid-training holds the float weights (and the learned scales, which it resumes
    from); frozen or recomputed scales are buffers."""
    quantized = QuantLinear.from_float(torch.randn(16, 64), None, 4, 32, False)
    assert set(FakeQuantLinear.from_quant_linear(quantized, scale_mode="frozen").state_dict()) == {"weight"}
    assert set(FakeQuantLinear.from_quant_linear(quantized).state_dict()) == {"weight", "weight_scale"}


def test_int8_embeddings_stay_frozen_and_quantized():
    """With `embedding_bits=8` the int8 embedding and head stay as they are (frozen) while gradients reach the
    fake-quantized layers through them; convert_qat keeps the int8 head."""
    from optimum_agentos.nn.embedding import QuantHead
    from optimum_agentos.quantization.embedding import quantize_embeddings

    model = build_tiny("llama")
    config = AgentOSConfig(bits=4, group_size=64, embedding_bits=8)
    quantize_model_rtn(model, config)
    quantize_embeddings(model)
    mark_compressed(model, config)
    prepare_qat(model).train()
    ids = sample_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in qat_layers(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
    convert_qat(model)
    assert isinstance(model.lm_head, QuantHead) and model.config.quantization_config.embedding_bits == 8
