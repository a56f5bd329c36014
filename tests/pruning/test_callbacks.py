"""Recovery fine-tuning callbacks, exercised with a real `Trainer` on tiny models (CPU, a few seconds each)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from optimum_agentos.config import DEFAULT_IGNORE
from optimum_agentos.pruning import magnitude_scores, mask_from_scores
from optimum_agentos.pruning.callbacks import (
    GradualPruningCallback, MaskFixedCallback, cubic_sparsity, masks_from_zeros,
)
from optimum_agentos.nn.linear import float_weight
from optimum_agentos.nn.targets import resolve_targets

from ..conftest import build_tiny, sample_ids


IDS = sample_ids(n=8, length=16, seed=3)


def dataset():
    return Dataset.from_dict({"input_ids": IDS.tolist(), "labels": IDS.tolist()})


def train(model, callbacks, tmp_path, steps=8, weight_decay=0.1):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        weight_decay=weight_decay, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks).train()
    return model.eval()


def loss(model) -> float:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, labels=IDS).loss.item()


def pruned_llama(sparsity=0.5):
    """A tiny llama with `sparsity` of every row of its linear layers (not lm_head) zeroed by magnitude."""
    model = build_tiny("llama")
    modules = dict(model.named_modules())
    masks = {}
    for name in resolve_targets(model, None, list(DEFAULT_IGNORE)):
        weight = modules[name].weight
        masks[name] = mask_from_scores(magnitude_scores(weight), sparsity)
        with torch.no_grad():
            weight.masked_fill_(masks[name], 0)
    return model, masks


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.5, 0.1, start_step=10, end_step=30) == 0.1
    assert cubic_sparsity(10, 0.5, 0.1, start_step=10, end_step=30) == 0.1
    assert cubic_sparsity(20, 0.5, 0.1, start_step=10, end_step=30) == pytest.approx(0.5 - 0.4 * 0.125)
    assert cubic_sparsity(30, 0.5, 0.1, start_step=10, end_step=30) == 0.5
    assert cubic_sparsity(99, 0.5, 0.1, start_step=10, end_step=30) == 0.5
    values = [cubic_sparsity(t, 0.8, 0.0, 0, 50) for t in range(60)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[10] - values[0] > values[50] - values[40]  # prunes fast early, slowly late


def test_masks_from_zeros_skips_head_and_sees_through_wrappers():
    model, masks = pruned_llama()
    found = masks_from_zeros(model)
    assert found.keys() == masks.keys() and "lm_head" not in found
    assert all(torch.equal(found[n], masks[n]) for n in masks)
    assert masks_from_zeros(nn.DataParallel(model)).keys() == masks.keys()  # unwraps `.module`


def test_mask_fixed_keeps_zeros_while_the_rest_learns(tmp_path):
    model, masks = pruned_llama()
    before = {n: w.detach().clone() for n, w in model.named_parameters()}
    loss_before = loss(model)
    callback = MaskFixedCallback()  # masks come from the zeros
    train(model, [callback], tmp_path)
    assert callback.masks.keys() == masks.keys()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[name + ".weight"]
        assert (weight[mask] == 0).all(), name
        assert not torch.equal(weight[~mask], before[name + ".weight"][~mask]), name
    assert loss(model) < loss_before - 0.05
    assert not callback._hooks  # removed on train end


def test_without_callback_the_zeros_drift(tmp_path):
    """The control for the test above: AdamW and weight decay do revive pruned weights."""
    model, masks = pruned_llama()
    train(model, [], tmp_path)
    params = dict(model.named_parameters())
    assert any((params[n + ".weight"][m] != 0).any() for n, m in masks.items())


def test_explicit_masks_also_clean_the_optimizer_state(tmp_path):
    model, masks = pruned_llama()
    down = "model.layers.0.mlp.down_proj"
    optimizers = []

    class Grab(TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            optimizers.append(optimizer)

    train(model, [MaskFixedCallback({down: masks[down]}), Grab()], tmp_path, steps=4)
    weight = model.get_submodule(down).weight
    assert (weight[masks[down]] == 0).all()
    exp_avg = optimizers[0].state[weight]["exp_avg"]
    assert (exp_avg[masks[down]] == 0).all() and (exp_avg[~masks[down]] != 0).any()
    other = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]  # not in the given masks
    assert (other[masks["model.layers.0.mlp.up_proj"]] != 0).any()


class SparsityRecorder(TrainerCallback):
    def __init__(self, names):
        self.names, self.history = names, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        modules = dict(model.named_modules())
        self.history.append(sum(float((modules[n].weight == 0).float().mean()) for n in self.names) / len(self.names))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradual_pruning_follows_the_schedule(kind, tmp_path):
    model = build_tiny(kind)
    names = resolve_targets(model, None, list(DEFAULT_IGNORE))
    callback = GradualPruningCallback(0.5, frequency=2)  # end_step = 75% of 12 = 9
    recorder = SparsityRecorder(names)
    train(model, [callback, recorder], tmp_path, steps=12)
    history = recorder.history
    assert len(history) == 12 and history[0] == 0 < history[1]  # steps 1..12; prunes at 2, 4, 6, 8 and 9
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:])) and history[5] < history[-1]
    assert callback.current_sparsity == 0.5 and callback.masks.keys() == set(names)
    modules = dict(model.named_modules())
    for name in names:
        weight = float_weight(modules[name])  # [out, in], GPT-2's Conv1D included
        zeros_per_row = (weight == 0).sum(dim=1).float()
        assert ((zeros_per_row - weight.shape[1] * 0.5).abs() <= 1).all(), name
        assert torch.equal(modules[name].weight == 0, callback.masks[name]), name
    for name, module in modules.items():
        if isinstance(module, nn.Embedding) or name == "lm_head":
            assert (module.weight != 0).all(), name


def test_gradual_n_m_snaps_to_the_pattern_at_end_step(tmp_path):
    model = build_tiny("llama")
    callback = GradualPruningCallback(0.5, pattern="2:4", end_step=6, frequency=2, target=["re:.*mlp.*"])
    train(model, [callback], tmp_path, steps=8)
    for name, mask in callback.masks.items():
        assert "mlp" in name
        weight = model.get_submodule(name).weight
        assert ((~mask).reshape(mask.shape[0], -1, 4).sum(dim=-1) == 2).all(), name
        assert (weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1).ge(2).all(), name


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="must be in"):
        GradualPruningCallback(1.0)
    with pytest.raises(ValueError, match="must not exceed"):
        GradualPruningCallback(0.3, initial_sparsity=0.5)
    with pytest.raises(ValueError, match="prunes 0.5"):
        GradualPruningCallback(0.7, pattern="2:4")
    model, masks = pruned_llama()
    missing = "model.layers.9.self_attn.q_proj"
    with pytest.raises(ValueError, match=missing):
        train(model, [MaskFixedCallback({missing: masks["model.layers.0.self_attn.q_proj"]})], tmp_path, steps=1)
    down = "model.layers.0.mlp.down_proj"  # [96, 160]
    with pytest.raises(ValueError, match="has shape"):
        train(model, [MaskFixedCallback({down: masks[down].t()})], tmp_path, steps=1)


def test_peft_lora_keeps_base_zeros_and_trains_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    model, masks = pruned_llama()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    # Masks named as on the plain model fit the PEFT model; so do masks read back from it (adapters excluded).
    assert masks_from_zeros(lora).keys() == masks.keys()
    callback = MaskFixedCallback(masks)
    train(lora, [callback], tmp_path, steps=4)
    base = lora.get_base_model()
    for name, mask in masks.items():
        module = base.get_submodule(name)
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        assert (weight[mask] == 0).all(), name
    lora_b = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert lora_b and all((p != 0).any() for p in lora_b)  # adapters trained, not masked
