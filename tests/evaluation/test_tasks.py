"""Standard tasks: local copies converted to the Hub's rows, lm-eval numbers equal to lm-eval run directly, GLUE
metrics and classifiers, STS-B on the real MiniLM, and clear errors for bad input."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from optimum_agentos.evaluation import DatasetUnavailableError, evaluate_model
from optimum_agentos.evaluation.classification import evaluate_classifier, mean_pooled
from optimum_agentos.data import DATA_DIR_ENV
from optimum_agentos.evaluation.glue import glue_metrics, glue_scores, load_glue
from optimum_agentos.evaluation.harness import HARNESS_TASKS, build_task, local_rows, run_harness
from optimum_agentos.evaluation.tasks import check_tasks
from optimum_agentos.models import resolve_model

from ..conftest import build_tiny

# rows per local file (shared/data/README.md)
ROWS = {"lambada": 5153, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "boolq": 3270}
GLUE_ROWS = {"sst2": (872, {0, 1}), "mrpc": (408, {0, 1}), "rte": (277, {0, 1}), "cola": (1043, {0, 1}),
             "stsb": (1500, None)}


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(HARNESS_TASKS))
def test_local_rows_have_the_hub_format(name):
    rows = local_rows(name)
    assert len(rows) == ROWS[name]
    first = rows[0]
    if name.startswith("arc"):
        assert isinstance(first["question"], str) and set(first["choices"]) == {"text", "label"}
        assert all(r["answerKey"] in r["choices"]["label"] for r in rows)
    elif name == "piqa":
        assert {r["label"] for r in rows} == {0, 1} and sum(r["label"] for r in rows) == 928
    elif name == "boolq":
        assert sum(r["label"] for r in rows) == 2033  # "true" rows (README: 2,033 true / 1,237 false)
    elif name == "winogrande":
        assert {r["answer"] for r in rows} == {"1", "2"}


@pytest.mark.data
def test_harness_task_uses_lm_evals_own_prompt():
    task = build_task("arc_easy")
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    assert task.doc_to_choice(doc) == doc["choices"]["text"]


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "winogrande", "lambada"])
def test_missing_dataset_offline_names_the_file_and_variable(name, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match=rf"{HARNESS_TASKS[name].file}.*OPTIMUM_AGENTOS_DATA_DIR"):
        build_task(name)


@pytest.mark.data
@pytest.mark.parametrize("task", sorted(GLUE_ROWS))
def test_glue_rows(task):
    data = load_glue(task, "validation")
    rows, labels = GLUE_ROWS[task]
    assert len(data) == rows
    if labels:
        assert set(data["label"]) == labels
    else:
        assert 0.0 <= min(data["label"]) and max(data["label"]) <= 5.0
    assert all(isinstance(t, str) and t for t in data[data.column_names[0]])


def test_glue_metrics_match_their_definitions():
    refs = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    preds = [1, 0, 0, 1, 1, 1, 0, 1, 1, 0]
    tp = sum(p == r == 1 for p, r in zip(preds, refs))
    fp = sum(p == 1 and r == 0 for p, r in zip(preds, refs))
    fn = sum(p == 0 and r == 1 for p, r in zip(preds, refs))
    tn = sum(p == r == 0 for p, r in zip(preds, refs))
    assert glue_metrics("mrpc", preds, refs) == pytest.approx({"f1": 2 * tp / (2 * tp + fp + fn), "accuracy": 0.6})
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue_metrics("cola", preds, refs)["matthews_correlation"] == pytest.approx(mcc)
    x, y = [0.1, 0.4, 0.35, 0.8], [0.0, 2.0, 1.0, 5.0]
    scores = glue_metrics("stsb", x, y)
    assert scores["spearmanr"] == pytest.approx(1.0)
    assert scores["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_glue_scores_name_their_source_and_never_hide_a_metric_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # evaluate cannot fetch its metric script: the formulas serve
    scores, source = glue_scores("mrpc", [1, 0, 1], [1, 0, 0])
    assert scores == pytest.approx({"f1": 2 / 3, "accuracy": 2 / 3})
    assert source.startswith("optimum-agentos formulas (evaluate's glue metric unavailable")
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):  # a real failure is raised
        glue_scores("mrpc", [1, 0, 1], [1, 0])


@pytest.fixture(scope="module")
def minilm():
    path = resolve_model("minilm-l6")
    return path, AutoTokenizer.from_pretrained(path)


@pytest.mark.data
@pytest.mark.model("minilm-l6")
def test_classifier_batched_equals_one_by_one(minilm):
    _, tokenizer = minilm
    model = build_tiny("bert", vocab_size=tokenizer.vocab_size, hidden_size=64, max_position_embeddings=512)
    scores = evaluate_classifier(model, tokenizer, "sst2", limit=40, batch_size=16)
    data = load_glue("sst2", "validation").select(range(40))
    with torch.no_grad():
        preds = [int(model(**tokenizer(s, return_tensors="pt")).logits.argmax(-1)) for s in data["sentence"]]
    assert scores["n"] == 40
    assert scores["accuracy"] == sum(p == r for p, r in zip(preds, data["label"])) / 40


@pytest.mark.data
@pytest.mark.model("minilm-l6")
def test_classifier_label_count_mismatch_is_named(minilm):
    _, tokenizer = minilm
    model = build_tiny("bert", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_labels=3, max_position_embeddings=512)
    with pytest.raises(ValueError, match="2 label.*head has 3"):
        evaluate_classifier(model, tokenizer, "sst2", limit=4)


@pytest.mark.slow
def test_stsb_spearman_of_the_real_minilm(minilm):
    path, tokenizer = minilm
    model = AutoModel.from_pretrained(path)
    (result,) = evaluate_model(model, tokenizer, ["stsb"], limit=200)
    assert result.metric == "spearmanr" and result.n == 200
    # all-MiniLM-L6-v2 is a strong STS model: well above chance, below perfect
    assert 0.75 < result.value < 0.95
    data = load_glue("stsb", "validation").select(range(200))
    sims = []
    with torch.no_grad():  # one sentence at a time, no padding: the batched, masked pooling must agree
        for a, b in zip(data["sentence1"], data["sentence2"]):
            first, second = (mean_pooled(model, tokenizer(s, return_tensors="pt")) for s in (a, b))
            sims.append(float(torch.cosine_similarity(first, second)))
    assert result.value == pytest.approx(glue_metrics("stsb", sims, data["label"])["spearmanr"], abs=1e-4)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown task.*wikitext9.*known: wikitext2"):
        check_tasks("wikitext2,wikitext9")


def test_task_model_mismatch_is_named():
    with pytest.raises(ValueError, match="'sst2' needs a sequence classifier.*LlamaForCausalLM"):
        check_tasks(["sst2"], build_tiny("llama"))
    with pytest.raises(ValueError, match="'wikitext2' needs a causal LM.*BertForSequenceClassification"):
        check_tasks(["wikitext2"], build_tiny("bert"))


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arc_easy", "winogrande", "lambada"])  # choices, partial scoring, loglikelihood
def test_harness_equals_lm_eval_run_directly(smollm2, name, tmp_path):
    """Our task (local rows handed to lm-eval) gives exactly the number lm-eval gives on its own, when lm-eval reads
    the same rows through its own dataset loading (`dataset_path: json`) from a file we write in the Hub format."""
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask

    from optimum_agentos.evaluation.harness import _base_config, lm_eval_wrapper

    model, tokenizer = smollm2
    ours = run_harness(model, tokenizer, [name], limit=24, per_example=True)[name]
    spec = HARNESS_TASKS[name]
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in local_rows(name)))
    config = _base_config(spec.lm_eval_name)
    for key in ("tag", "group"):
        config.pop(key, None)
    split_key = "test_split" if spec.split == "test" else "validation_split"
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {spec.split: str(data_file)}},
                  training_split=None, validation_split=None, test_split=None, fewshot_split=None, num_fewshot=0)
    config[split_key] = spec.split
    direct = simple_evaluate(model=lm_eval_wrapper(model, tokenizer), tasks=[ConfigurableTask(config=config)],
                             limit=24, log_samples=True, bootstrap_iters=0)
    theirs = direct["results"][spec.lm_eval_name]
    assert ours["n"] == 24
    assert ours["acc"] == theirs["acc,none"]
    assert 0.0 <= ours["acc"] <= 1.0
    # per document, in split order: lm-eval's own per-sample scores, and they average to the accuracy
    samples = sorted(direct["samples"][spec.lm_eval_name], key=lambda sample: sample["doc_id"])
    assert ours["per_example"]["acc"] == [float(sample["acc"]) for sample in samples]
    assert sum(ours["per_example"]["acc"]) / 24 == pytest.approx(ours["acc"])


@pytest.mark.slow
def test_evaluate_model_perplexity_and_zero_shot(smollm2):
    model, tokenizer = smollm2
    results = {r.task: r for r in evaluate_model(model, tokenizer, ["wikitext2", "arc_easy"], limit=40,
                                                 ppl_windows=4)}
    assert results["wikitext2"].metric == "perplexity" and results["wikitext2"].n == 4
    assert 20 < results["wikitext2"].value < 45  # SmolLM2-135M: 29.9 over 64 windows
    assert results["arc_easy"].hub_dataset == "allenai/ai2_arc" and results["arc_easy"].n == 40
    assert 0.25 < results["arc_easy"].value <= 1.0  # above 4-way chance
    assert "acc_norm" in results["arc_easy"].extra
