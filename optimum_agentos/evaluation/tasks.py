"""The task registry and `evaluate_model`: standard datasets on in-memory models (plain, quantized, pruned).

| kind | tasks | model | how |
|---|---|---|---|
| perplexity | wikitext2, ptb | causal LM | GPTQ protocol (`perplexity.py`) |
| zero-shot | lambada, arc_easy, arc_challenge, piqa, winogrande, boolq | causal LM | lm-eval (`harness.py`) |
| glue | sst2, mrpc, rte, cola, stsb | sequence classifier | GLUE metrics (`glue.py`) |
| sts | stsb | encoder without a head | Spearman of embedding cosines |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class TaskInfo:
    """What a task reports and where its dataset lives on the Hub (for the card's `model-index`).

    Args:
        kind (`str`): `perplexity`, `zero-shot` or `glue`.
        metric (`str`): the headline metric.
        higher_is_better (`bool`): the direction of the headline metric.
        hub_dataset (`str`): Hub dataset id; `hub_config` its configuration.
        split (`str`): the split evaluated.
    """

    kind: str
    metric: str
    higher_is_better: bool
    hub_dataset: str
    hub_config: str | None
    split: str


TASKS: dict[str, TaskInfo] = {
    "wikitext2": TaskInfo("perplexity", "perplexity", False, "wikitext", "wikitext-2-raw-v1", "test"),
    "ptb": TaskInfo("perplexity", "perplexity", False, "ptb_text_only", "penn_treebank", "test"),
    "lambada": TaskInfo("zero-shot", "acc", True, "EleutherAI/lambada_openai", "default", "test"),
    "arc_easy": TaskInfo("zero-shot", "acc", True, "allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": TaskInfo("zero-shot", "acc", True, "allenai/ai2_arc", "ARC-Challenge", "test"),
    "piqa": TaskInfo("zero-shot", "acc", True, "baber/piqa", None, "validation"),
    "winogrande": TaskInfo("zero-shot", "acc", True, "allenai/winogrande", "winogrande_xl", "validation"),
    "boolq": TaskInfo("zero-shot", "acc", True, "aps/super_glue", "boolq", "validation"),
    "sst2": TaskInfo("glue", "accuracy", True, "nyu-mll/glue", "sst2", "validation"),
    "mrpc": TaskInfo("glue", "f1", True, "nyu-mll/glue", "mrpc", "validation"),
    "rte": TaskInfo("glue", "accuracy", True, "nyu-mll/glue", "rte", "validation"),
    "cola": TaskInfo("glue", "matthews_correlation", True, "nyu-mll/glue", "cola", "validation"),
    "stsb": TaskInfo("glue", "spearmanr", True, "nyu-mll/glue", "stsb", "validation"),
}


@dataclass
class TaskResult:
    """One number: `value` of `metric` on `task`, over `n` examples (rows, windows or documents)."""

    task: str
    metric: str
    value: float
    n: int
    split: str
    higher_is_better: bool
    hub_dataset: str
    hub_config: str | None
    extra: dict

    def to_dict(self) -> dict:
        return asdict(self)


def model_kind(model) -> str:
    """`causal-lm`, `classifier` or `encoder`, from the model class (what the task families need)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    return "encoder"


NEEDS = {"perplexity": ("causal-lm",), "zero-shot": ("causal-lm",), "glue": ("classifier", "encoder")}


def check_tasks(names, model=None) -> list[str]:
    """Validate task names (and that `model` can run them) before any work starts; returns the list."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}.")
    if model is not None:
        kind = model_kind(model)
        for name in names:
            info = TASKS[name]
            if kind not in NEEDS[info.kind] or (kind == "encoder" and name != "stsb"):
                wanted = "a causal LM (AutoModelForCausalLM)" if info.kind != "glue" else (
                    "a sequence classifier (AutoModelForSequenceClassification)"
                    + (" or a sentence-embedding encoder (AutoModel)" if name == "stsb" else ""))
                raise ValueError(f"Task {name!r} needs {wanted}, but the model is a {type(model).__name__} ({kind}).")
    return names


def evaluate_model(model, tokenizer, tasks, limit: int | None = None, ppl_windows: int | None = 64,
                   seq_len: int = 512, batch_size: int = 16, per_example: bool = False) -> list[TaskResult]:
    """Evaluate an in-memory model on standard tasks.

    Args:
        model: a loaded model (plain, quantized or pruned), on any device.
        tokenizer: its tokenizer.
        tasks (`list[str]` or comma-separated `str`): names from `TASKS`.
        limit (`int`, *optional*): first `limit` examples of zero-shot and GLUE tasks (`None`: the full split).
        ppl_windows (`int`, *optional*, defaults to 64): perplexity windows of `seq_len` tokens (`None`: all).
        batch_size (`int`, *optional*, defaults to 16): lm-eval and GLUE batch size.
        per_example (`bool`, *optional*, defaults to `False`): zero-shot results also keep each document's metrics
            in `extra["per_example"]` (`{metric: [value per document]}`), to compare two models on the same documents.

    Example:
    ```python
    >>> from optimum_agentos.evaluation import evaluate_model
    >>> results = evaluate_model(model, tokenizer, ["wikitext2", "arc_easy"], limit=200)
    >>> {r.task: r.value for r in results}
    ```
    """
    from .classification import evaluate_classifier, evaluate_sts
    from ..data import load_text, tokenize_text
    from .harness import run_harness
    from .perplexity import perplexity_from_ids

    names = check_tasks(tasks, model)
    results = []

    def add(name, scores, metric=None):
        info = TASKS[name]
        metric = metric or info.metric
        extra = {k: v for k, v in scores.items() if k not in (metric, "n")}
        results.append(TaskResult(name, metric, float(scores[metric]), int(scores["n"]), info.split,
                                   info.higher_is_better, info.hub_dataset, info.hub_config, extra))

    zero_shot = [n for n in names if TASKS[n].kind == "zero-shot"]
    harness_scores = run_harness(model, tokenizer, zero_shot, limit=limit, batch_size=batch_size,
                                  per_example=per_example) if zero_shot else {}
    for name in names:
        info = TASKS[name]
        if info.kind == "perplexity":
            ids = tokenize_text(tokenizer, load_text(name, info.split))  # once: the window count comes from it too
            windows = ppl_windows or len(ids) // seq_len
            add(name, {"perplexity": perplexity_from_ids(model, ids, seq_len, windows), "n": windows})
        elif info.kind == "zero-shot":
            add(name, harness_scores[name])
        elif model_kind(model) == "encoder":
            add(name, evaluate_sts(model, tokenizer, info.split, limit, batch_size), "spearmanr")
        else:
            add(name, evaluate_classifier(model, tokenizer, name, info.split, limit, batch_size))
        logger.info(f"{name}: {results[-1].metric} = {results[-1].value:.4f} (n={results[-1].n})")
    return results
