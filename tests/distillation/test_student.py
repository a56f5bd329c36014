"""make_student: which teacher layers it keeps, that their weights are copied, and that the result saves and reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from optimum_agentos.distillation import make_student, uniform_layer_selection

from ..conftest import build_tiny, sample_ids
from .test_trainer import tiny_bert, tiny_llama


@pytest.mark.parametrize("teacher_layers, num_layers, expected", [
    (6, 3, [0, 2, 4]), (12, 6, [0, 2, 4, 6, 8, 10]), (30, 24, None), (4, 4, [0, 1, 2, 3]), (5, 1, [0]),
])
def test_uniform_layer_selection(teacher_layers, num_layers, expected):
    got = uniform_layer_selection(teacher_layers, num_layers)
    assert len(got) == num_layers and got == sorted(set(got)) and got[0] == 0
    if expected is not None:
        assert got == expected


def test_bert_student_copies_the_selected_layers_and_leaves_the_teacher_alone(tmp_path):
    teacher = tiny_bert(4)
    student = make_student(teacher, num_layers=2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert len(teacher.bert.encoder.layer) == 4 and len(student.bert.encoder.layer) == 2
    for s_idx, t_idx in enumerate([0, 2]):
        for (name, a), b in zip(student.bert.encoder.layer[s_idx].state_dict().items(),
                                teacher.bert.encoder.layer[t_idx].state_dict().values()):
            assert torch.equal(a, b), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    student.bert.embeddings.word_embeddings.weight.data.zero_()  # a copy, not shared storage
    assert teacher.bert.embeddings.word_embeddings.weight.abs().sum() > 0

    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    ids = sample_ids(2, 10)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_llama_student_renumbers_cache_slots_and_generates():
    teacher = tiny_llama(4)
    student = make_student(teacher, layers=[1, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    out = student.generate(sample_ids(1, 5), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 10)
    # an identity check: keeping every layer reproduces the teacher
    same = make_student(teacher, num_layers=4)
    ids = sample_ids(2, 8)
    torch.testing.assert_close(same(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_llama_student_reloads_with_auto_class(tmp_path):
    student = make_student(build_tiny("llama"), num_layers=1)
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.agentos_student_of_layers == [0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_layers=0), "between 1 and"), (dict(num_layers=5), "between 1 and"), (dict(), "Pass num_layers"),
    (dict(layers=[0, 7]), "out of range"), (dict(layers=[1, 1]), "duplicates"),
])
def test_make_student_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_student(tiny_bert(4), **kwargs)
