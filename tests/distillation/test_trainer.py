"""DistillationTrainer on tiny models: the student moves toward the teacher, the teacher never moves, PEFT and pruned
students, the top-k cache, resuming, and the up-front checks."""

import copy

import pytest
import torch
import transformers
from datasets import Dataset, load_from_disk

from optimum_agentos.distillation import (
    DistillationConfig, DistillationTrainer, distillation_loss, make_student, precompute_teacher_topk,
)

from ..conftest import build_tiny


def tiny_bert(layers=4, seed=0, num_labels=2):
    return build_tiny("bert", seed, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_llama(layers=2, seed=0, vocab=128, sharpness=1.0):
    model = build_tiny("llama", seed, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers)
    model.lm_head.weight.data *= sharpness  # > 1: confident predictions, as a trained teacher makes
    return model


def classification_data(teacher, n=64, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (n, length), generator=g)
    with torch.no_grad():
        labels = teacher(input_ids=ids).logits.argmax(-1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


def lm_data(n=32, length=16, seed=2, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[::2, -pad:] = 0  # every other row right-padded
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=8, learning_rate=2e-3,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=10, disable_tqdm=True,
        lr_scheduler_type="constant", warmup_steps=0,
    )
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


def held_out_kl(student, teacher, data, temperature=1.0):
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t = student.eval()(**batch).logits, teacher(**batch).logits
    mask = batch["attention_mask"].bool() if s.dim() == 3 else None
    return float(distillation_loss(s, t, mask, temperature))


# --------------------------------------------------------------------------------------------------- training


def test_classifier_student_approaches_the_frozen_teacher(tmp_path):
    teacher = tiny_bert(4)
    teacher.classifier.weight.data *= 30  # a confident teacher, so its soft labels carry information
    student = make_student(teacher, num_layers=2)
    torch.nn.init.normal_(student.classifier.weight, std=0.5)  # start away from the teacher
    teacher_state = copy.deepcopy(teacher.state_dict())
    train, held = classification_data(teacher, seed=1), classification_data(teacher, n=32, seed=3)
    before = held_out_kl(student, teacher, held)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, alpha_kd=1.0),
                                  train_dataset=train)
    trainer.train()
    after = held_out_kl(student, teacher, held)
    assert after < 0.5 * before, (before, after)
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name
    assert any("loss_kd" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_causal_lm_student_learns_with_padding_masked(kind, tmp_path):
    teacher = tiny_llama(2, sharpness=20)
    student = tiny_llama(1, seed=5)
    train = lm_data(pad=5)
    seen = train.select(range(8))  # random tokens: the student fits what it is shown faster than it generalizes
    before = held_out_kl(student, teacher, seen)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                                  args=args(tmp_path, alpha_kd=1.0, kd_loss=kind, kd_chunk_size=7, max_steps=40,
                                            learning_rate=5e-3))
    trainer.train()
    assert held_out_kl(student, teacher, seen) < 0.6 * before


def test_positions_skip_padding_and_ignored_next_labels():
    labels = torch.tensor([[5, 6, 7, -100], [5, -100, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = DistillationTrainer._positions({"labels": labels, "attention_mask": mask}, torch.zeros(2, 4, 3))
    # position t predicts label t+1; the last position predicts nothing
    assert got.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert DistillationTrainer._positions({}, torch.zeros(2, 3)) is None


def test_hidden_state_and_attention_losses_train_and_switch_to_eager(tmp_path):
    teacher = tiny_bert(4)
    student = tiny_bert(2, seed=7)  # random, same widths: far from the teacher's states and maps
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=classification_data(teacher),
        args=args(tmp_path, max_steps=10, alpha_kd=0.0, alpha_ce=0.0, hidden_loss_weight=1.0,
                  attention_loss_weight=1.0, logging_steps=1),
    )
    assert trainer.args.hidden_layer_map == {1: 2, 2: 4} and trainer.args.attention_layer_map == {1: 3}
    assert student.config._attn_implementation == "eager"
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_hidden" in e]
    assert logs[-1]["loss_hidden"] < logs[0]["loss_hidden"] and logs[-1]["loss_attention"] < logs[0]["loss_attention"]


def test_peft_student_trains_only_its_adapters(tmp_path):
    from peft import LoraConfig

    teacher = tiny_llama(2)
    student = tiny_llama(2, seed=9)
    base = copy.deepcopy(student.state_dict())
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=lm_data(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        args=args(tmp_path, max_steps=5),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)
    merged_base = trainer.model.get_base_model()
    for name, value in merged_base.state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, base[key]), name


def test_pruned_student_keeps_its_zeros_with_mask_fixed_callback(tmp_path):
    from optimum_agentos import Pruner, PruningConfig
    from optimum_agentos.pruning import MaskFixedCallback

    teacher = tiny_llama(2)
    student = Pruner(copy.deepcopy(teacher)).prune_in_place(PruningConfig(method="magnitude", sparsity=0.5))
    zeros = {n: m.weight == 0 for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=lm_data(),
                                  args=args(tmp_path, max_steps=5), callbacks=[MaskFixedCallback()])
    trainer.train()
    modules = dict(student.named_modules())
    for name, was_zero in zeros.items():
        assert was_zero.float().mean() == 0.5 and (modules[name].weight[was_zero] == 0).all(), name


# ------------------------------------------------------------------------------------------------ top-k cache


def test_topk_cache_round_trips_and_trains_without_the_teacher(tmp_path):
    teacher = tiny_llama(2, sharpness=20)
    student = tiny_llama(1, seed=5)
    data = lm_data()
    cached = precompute_teacher_topk(teacher, data, k=128, batch_size=5, output_dir=tmp_path / "cache")
    reloaded = load_from_disk(str(tmp_path / "cache"))
    assert reloaded.column_names == cached.column_names and len(reloaded[0]["teacher_topk_logits"]) == 16
    # with k = the whole vocabulary the cached loss equals the live-teacher loss (fp16 storage of the logits)
    batch = {k: torch.tensor(reloaded[:8][k]) for k in reloaded.column_names}
    live = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                               args=args(tmp_path, alpha_kd=1.0))
    from_cache = DistillationTrainer(model=student, train_dataset=reloaded, args=args(tmp_path, alpha_kd=1.0))
    assert from_cache.teacher is None
    with torch.no_grad():
        a = live.compute_loss(student, {k: v for k, v in batch.items() if not k.startswith("teacher")})
        b = from_cache.compute_loss(student, batch)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    seen = data.select(range(8))
    before = held_out_kl(student, teacher, seen)
    from_cache.args.max_steps, from_cache.args.learning_rate = 40, 5e-3
    from_cache.train()
    assert held_out_kl(student, teacher, seen) < 0.6 * before


def test_topk_cache_for_a_classifier_caps_k_at_the_label_count(tmp_path):
    teacher = tiny_bert(2)
    cached = precompute_teacher_topk(teacher, classification_data(teacher, n=10), k=64, batch_size=4)
    assert len(cached[0]["teacher_topk_logits"]) == 2 and sorted(cached[0]["teacher_topk_indices"]) == [0, 1]


# ------------------------------------------------------------------------------------------------------ resume


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    class StopAt(transformers.TrainerCallback):  # an interruption: the run stops after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    def run(out, resume=None, interrupt=False):
        teacher = tiny_bert(4)
        student = make_student(teacher, num_layers=2)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=classification_data(teacher),
            args=args(tmp_path, output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=3,
                      per_device_train_batch_size=4, lr_scheduler_type="linear"),
            callbacks=[StopAt()] if interrupt else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return student.state_dict()

    straight = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", interrupt=True)
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "checkpoint-3"))
    assert not torch.equal(interrupted["classifier.weight"], straight["classifier.weight"])
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(kd_loss="mse"), "kd_loss must be one of"),
    (dict(jsd_beta=1.0), "jsd_beta"),
    (dict(alpha_kd=-1.0), "alpha_kd must be >= 0"),
    (dict(alpha_kd=0.0, alpha_ce=0.0), "Every loss weight is 0"),
    (dict(hidden_layer_map="1-2"), "student:teacher"),
])
def test_config_rejects_bad_values(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        args(tmp_path, **kwargs)


def test_config_parses_from_the_command_line():
    parser = transformers.HfArgumentParser(DistillationConfig)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--temperature", "3", "--kd_loss", "jsd", "--hidden_layer_map", "1:2,2:4",
         "--report_to", "none"]
    )
    assert parsed.temperature == 3.0 and parsed.kd_loss == "jsd" and parsed.hidden_layer_map == {1: 2, 2: 4}


def word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("case, message", [
    ("vocab", "Vocabulary mismatch: the student predicts 130 tokens, the teacher 128"),
    ("labels", "The student has 3 labels but the teacher has 2"),
    ("task", "The student is a sequence classifier but the teacher is a language model"),
    ("hidden_map", "hidden_layer_map .* names layers that do not exist: {5: 2}"),
    ("attention_map", "attention_layer_map .* do not exist"),
    ("tokenizer", "Tokenizer mismatch"),
    ("no_teacher", "pass teacher_model=, or build the cache"),
    ("args", "must be a DistillationConfig"),
])
def test_trainer_checks_fail_early(case, message, tmp_path):
    teacher, student, extra, a = tiny_llama(2), tiny_llama(1), {}, args(tmp_path)
    if case == "vocab":
        student = tiny_llama(1, vocab=130)
    elif case == "labels":
        teacher, student = tiny_bert(2), tiny_bert(1, num_labels=3)
    elif case == "task":
        student = tiny_bert(1)
    elif case == "hidden_map":
        a = args(tmp_path, hidden_loss_weight=1.0, hidden_layer_map={5: 2})
    elif case == "attention_map":
        a = args(tmp_path, attention_loss_weight=1.0, attention_layer_map={0: 9})
    elif case == "tokenizer":
        extra = dict(processing_class=word_tokenizer(["a", "b"]), teacher_processing_class=word_tokenizer(["a", "c"]))
    elif case == "no_teacher":
        teacher = None
    elif case == "args":
        a = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with pytest.raises((ValueError, TypeError), match=message):
        DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=lm_data(), **extra)


def test_gpt2_student_from_make_student_generates(tmp_path):
    teacher = build_tiny("gpt2")
    student = make_student(teacher, layers=[1])
    DistillationTrainer(model=student, teacher_model=teacher, train_dataset=lm_data(),
                        args=args(tmp_path, max_steps=2)).train()
    out = student.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_tokenizers_saved_with_the_models_are_compared(tmp_path):
    """Neither tokenizer passed: the ones saved beside teacher and student are loaded (local files only) and
    compared; the same tokenizer passes."""
    for name, model, words in (("teacher", tiny_llama(2), ["a", "b"]), ("student", tiny_llama(1), ["a", "c"]),
                               ("twin", tiny_llama(1), ["a", "b"])):
        model.save_pretrained(tmp_path / name)
        word_tokenizer(words).save_pretrained(tmp_path / name)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="Tokenizer mismatch"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=lm_data())
    twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "twin")
    DistillationTrainer(model=twin, teacher_model=teacher, args=args(tmp_path), train_dataset=lm_data())
