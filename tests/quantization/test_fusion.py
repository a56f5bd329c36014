"""q/k/v and gate/up in one kernel call (nn/fusion.py): the same outputs as the layers alone, no second copy of the
codes, the same checkpoint, and every case it must not serve falling back to the layers alone."""

import shutil

import pytest
import torch
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.nn import dispatch, native
from optimum_agentos.nn.fusion import FusedGroup
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import run_python


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.delenv("OPTIMUM_AGENTOS_KERNELS", raising=False)


SETTINGS = [dict(bits=4, group_size=128), dict(bits=8, group_size=-1), dict(bits=8, group_size=-1, sym=True)]


def load(tmp_path, settings, kernel):
    """A tiny Llama (every width a multiple of 64, as the int4 layout needs) quantized on load, its layers forced
    onto their packed kernel at every length."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp",
                                                              quantization_config=AgentOSConfig(**settings)).eval()
    prepare_kernels(model, policy=kernel)
    return model


def groups(model):
    return {id(m.fused): m.fused for m in model.modules() if isinstance(m, QuantLinear) and m.fused is not None}


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("path", ["packed", "native", "vnni"])  # the packed kernel, or a native path on its layout
def test_fused_calls_give_the_same_outputs_and_share_the_codes(tmp_path, settings, path):
    kernel = {"packed": "int4pack-bf16" if settings["bits"] == 4 else "int8pack-bf16",
              "native": "native-int4" if settings["bits"] == 4 else "native-int8", "vnni": "native-int4-vnni"}[path]
    if path != "packed" and native.unavailable():
        pytest.skip(native.unavailable())
    if path == "vnni" and (settings["bits"] != 4 or native._vnni_unbuilt()):
        pytest.skip("int4 only" if settings["bits"] != 4 else native._vnni_unbuilt())
    model = load(tmp_path, settings, kernel)
    found = list(groups(model).values())
    assert len(found) == 4 and sorted(len(g.members) for g in found) == [2, 2, 3, 3]  # 2 blocks x (qkv, gate/up)
    for group in found:
        for member in group.members:  # each layer's codes are a view of the group's buffer
            start = member.kernel_weight.data_ptr() - group.kernel_weight.data_ptr()
            assert 0 <= start < group.kernel_weight.numel() * group.kernel_weight.element_size()
    codes = {name: m.codes().clone() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    prompt = torch.tensor([[5, 9, 17, 33, 2, 70]])
    with torch.no_grad():
        fused = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.unfuse()
        assert not groups(model)
        alone = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert torch.equal(fused.sequences, alone.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.logits, alone.logits))
    assert all(torch.equal(m.codes(), codes[name]) for name, m in model.named_modules() if isinstance(m, QuantLinear))


def test_the_cases_fusion_must_not_serve_compute_alone(tmp_path):
    model = load(tmp_path, dict(bits=8, group_size=-1), "int8pack-bf16")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 192)
    with torch.no_grad():
        alone = {n: getattr(attn, n)(x.clone()) for n in ("q_proj", "k_proj", "v_proj")}
        q = attn.q_proj(x)
        kept = attn.q_proj.fused._kept  # one group call: k and v outputs kept for this input
        assert kept[0] is x and set(kept[2]) == {attn.k_proj, attn.v_proj}
        x.mul_(2)  # changed in place after q_proj: k_proj must not return the kept output
        assert torch.equal(attn.k_proj(x), getattr(attn, "k_proj")(x.clone()))
        assert not torch.equal(attn.k_proj(x), alone["k_proj"])
        assert torch.equal(q, alone["q_proj"])
    with torch.inference_mode():
        y = torch.randn(1, 1, 192)
        assert torch.equal(attn.v_proj(y), attn.v_proj(y.clone()))
    grad_x = torch.randn(1, 1, 192, requires_grad=True)
    out = attn.q_proj(grad_x)  # autograd on: the exact reference path
    ref = torch.nn.functional.linear(grad_x, attn.q_proj.dequantize())
    assert torch.equal(out, ref)
    # new codes for one member dissolve its group
    q_proj = attn.q_proj
    group = q_proj.fused
    q_proj.load_codes(q_proj.codes(), q_proj.weight_scale, q_proj.weight_zero)
    assert all(m.fused is None for m in group.members)


def test_reference_policy_and_other_paths_do_not_fuse(tmp_path):
    model = load(tmp_path, dict(bits=4, group_size=128), "reference")
    assert not groups(model)
    prepare_kernels(model, policy="dequant-bf16")
    assert not groups(model)


def test_save_and_reload_in_a_fresh_process_fuses_again(tmp_path):
    model = load(tmp_path, dict(bits=4, group_size=128), "int4pack-bf16")
    model.save_pretrained(tmp_path / "q")
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        torch.save(model(ids[:, :1]).logits, tmp_path / "logits.pt")
    run_python(f"""
        import torch, transformers, optimum_agentos
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r})
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused is not None
        with torch.no_grad():
            logits = model(torch.tensor([[5]])).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True))
    """, env={dispatch.CACHE_ENV: str(tmp_path / "kernels"), "OPTIMUM_AGENTOS_KERNELS": "int4pack-bf16"})


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_graphs_call_the_kernel_once_per_group(tmp_path):
    if native.unavailable():
        pytest.skip(native.unavailable())
    from optimum_agentos import compile_for_generation

    eager = load(tmp_path, dict(bits=4, group_size=128), "native-int4")
    compiled = compile_for_generation(load(tmp_path, dict(bits=4, group_size=128), "native-int4"))
    assert all(group.in_graphs for group in groups(compiled).values())
    prompt = torch.tensor([[5, 9, 17, 33, 2, 70]])
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    try:
        want = eager.generate(prompt, cache_implementation="static", **kwargs)
        got = compiled.generate(prompt, **kwargs)
        with torch.profiler.profile() as profile:
            compiled.generate(prompt, **kwargs)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got.sequences, want.sequences)
    for logits, wanted in zip(got.logits, want.logits):  # inductor's float ops in another order: float32 rounding
        assert (logits - wanted).abs().max() <= 1e-3 * wanted.abs().max()
    calls = sum(e.count for e in profile.key_averages() if e.key == "agentos_native::int4_blocks_matmul")
    # 6 forwards x 2 blocks x (q/k/v, o, gate/up, down): 7 calls per block if the members' calls were not merged
    assert calls == 6 * 2 * 4


def test_siblings_on_different_paths_are_timed_as_a_group_and_the_choice_reproduces(tmp_path):
    if native.unavailable():
        pytest.skip(native.unavailable())
    from optimum_agentos.nn.fusion import SEPARATE, fuse_siblings
    from optimum_agentos.nn.prepare import _install, _Planner

    model = load(tmp_path, dict(bits=4, group_size=128), "auto")  # measures every path: the cache has their timings

    def split_routes():  # q and gate on the float32 loop, their siblings on the packed kernel at one token
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.unfuse()
                module.restore_weight()
                module.kernel.prepare(module)  # the native paths' scales, whatever the load chose
        for block in model.model.layers:
            for layer in (block.self_attn.q_proj, block.mlp.gate_proj):
                _install(layer, [[None, "native-int4"]])
            for layer in (block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.up_proj):
                _install(layer, [[1, "int4pack-bf16"], [None, "native-int4"]])
        planner = _Planner("auto", None, torch.float32)
        found = fuse_siblings(model, planner.group_path)
        planner.finish()
        return planner, found

    planner, found = split_routes()
    fused = {key: entry for key, entry in planner.cached.items() if key.startswith("fused:")}
    assert len(fused) == 2 and len(planner.measured) == 2  # q/k/v and gate/up shapes, timed once each
    for entry in fused.values():
        assert set(entry["us"]["1"]) == {"native-int4", SEPARATE} and all(us > 0 for us in entry["us"]["1"].values())
        assert entry["routes"] == [[None, min(entry["us"]["1"], key=entry["us"]["1"].get)]]
    assert len(found) == sum(2 for entry in fused.values() if entry["routes"][0][1] != SEPARATE)
    x = torch.randn(1, 1, 192)
    with torch.no_grad():
        for group in found:  # one-token calls only; each member's rows are what it computes alone on that path
            assert group.max_tokens == 1
            alone = [native.NativeInt4Blocks.run(m, x) for m in group.members]
            assert all(torch.equal(m(x), want) for m, want in zip(group.members, alone))
    cache = dispatch.cache_path().read_text()
    planner, again = split_routes()  # a second load reads the choice
    assert planner.measured == [] and dispatch.cache_path().read_text() == cache
    names = {id(module): name for name, module in model.named_modules()}
    assert [[names[id(m)] for m in g.members] for g in again] == [[names[id(m)] for m in g.members] for g in found]
