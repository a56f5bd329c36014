"""The published model cards (model_cards/<recipe>/, written by benchmarks/evaluation.py) say what the committed
evaluation report measured, and re-render to themselves. Reads files only: no model is loaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from optimum_agentos.evaluation.report import CompressionReport
from optimum_agentos.hub.card import CARD_INFO, refresh_card, write_card

REPO = Path(__file__).resolve().parents[1]
REPORT_DIR = REPO / "benchmarks" / "results" / "evaluation-report"
RESULTS = REPO / "benchmarks" / "results" / "evaluation.json"
CARDS = REPO / "model_cards"
RECIPES = ("smollm2-int4-gptq", "smollm2-sparse-int4", "smollm2-depth-distill")


def card_folders() -> list[Path]:
    return sorted(p for p in CARDS.iterdir() if (p / "README.md").is_file()) if CARDS.is_dir() else []


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def model_index_values(card: dict) -> dict[str, float]:
    """task name -> the metric value the card's model-index declares."""
    values = {}
    for entry in card.get("model-index", []):
        for result in entry["results"]:
            for metric in result["metrics"]:
                values[result["dataset"]["name"]] = metric["value"]
    return values


def table_rows(text: str) -> dict[str, list[str]]:
    """task -> cells of the card's baseline-vs-compressed table."""
    rows = {}
    lines = text.splitlines()
    start = lines.index("| task | metric | baseline | compressed | compressed / baseline |")
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def check_numbers(readme: str, report: CompressionReport, name: str) -> None:
    """Every number of the card's results (table and model-index) is the report's, as the card formats it."""
    expected = report.card_rows(name)
    assert expected, f"the report has no model {name!r}"
    index = model_index_values(front_matter(readme))
    rows = table_rows(readme)
    assert set(rows) == {r["task"] for r in expected}
    assert set(index) == {r["task"] for r in expected}
    for r in expected:
        _, metric, base, comp = rows[r["task"]][:4]
        assert metric == r["metric"]
        assert base == f"{r['baseline']:.2f}", (name, r["task"])
        assert comp == f"{r['compressed']:.2f}", (name, r["task"])
        assert rows[r["task"]][4] == f"{r['compressed'] / r['baseline']:.3f}", (name, r["task"])
        assert index[r["task"]] == pytest.approx(round(r["compressed"], 4), abs=1e-9), (name, r["task"])


def test_results_json_matches_the_report():
    """benchmarks/results/evaluation.json (the BENCHMARKS.md table's rows) holds the report's numbers."""
    report = CompressionReport.load(REPORT_DIR)
    saved = json.loads(RESULTS.read_text())
    expected = report.rows()
    assert len(saved) == len(expected)
    for row, want in zip(saved, expected):
        for key in ("model", "task", "metric", "n", "baseline", "compressed", "recovery"):
            assert row[key] == pytest.approx(want[key]) if isinstance(want[key], float) else row[key] == want[key]


def test_the_report_renders_into_a_card_with_its_numbers(tmp_path):
    """What benchmarks/evaluation.py does per recipe (card inputs + saved report -> refresh_card), on card inputs
    made here: the card carries the report's numbers."""
    report = CompressionReport.load(REPORT_DIR)
    for name in [m.name for m in report.models]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / CARD_INFO).write_text(json.dumps({
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": name,
            "config": {"bits": 4, "group_size": 128, "method": "gptq"}, "sizes": {},
        }))
        readme = refresh_card(folder, REPORT_DIR, model_name=name).read_text()
        check_numbers(readme, report, name)


@pytest.mark.skipif(not card_folders(), reason="model_cards/ holds no cards yet (benchmarks/evaluation.py writes them)")
def test_every_recipe_has_its_card_or_is_named_missing():
    """A recipe without a card in model_cards/ must be named as such in BENCHMARKS.md's evaluation section."""
    present = {p.name for p in card_folders()}
    assert present <= set(RECIPES)
    missing = sorted(set(RECIPES) - present)
    if missing:
        text = (REPO / "BENCHMARKS.md").read_text()
        assert f"Model cards not rendered for {', '.join(missing)}:" in text


@pytest.mark.parametrize("folder", card_folders(), ids=lambda p: p.name)
def test_card_numbers_match_the_report(folder):
    """The card's table and model-index are the committed report's numbers for this recipe, and the report copied
    beside the card is the committed one."""
    report = CompressionReport.load(REPORT_DIR)
    check_numbers((folder / "README.md").read_text(), report, folder.name)
    assert json.loads((folder / "report.json").read_text()) == json.loads((REPORT_DIR / "report.json").read_text())
    info = json.loads((folder / CARD_INFO).read_text())
    assert info["results"] == report.card_rows(folder.name)
    entry = next(m for m in report.models if m.name == folder.name)
    sizes = info.get("sizes") or {}
    if sizes.get("compressed"):  # the card's size line and the report's size column describe the same files
        assert sizes["compressed"] / 1e6 == pytest.approx(entry.stats["size_mb"], abs=0.05)


@pytest.mark.parametrize("folder", card_folders(), ids=lambda p: p.name)
def test_card_is_what_its_inputs_render(folder, tmp_path):
    """README.md is exactly what write_card renders from the saved agentos_card.json (nothing edited by hand)."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    write_card(copy, json.loads((folder / CARD_INFO).read_text()))
    assert (copy / "README.md").read_text() == (folder / "README.md").read_text()


def test_benchmarks_sections_open_and_close_once_and_their_results_exist():
    """Every BENCHMARKS.md section a script writes has its begin and end markers once each, in that order, and the
    results file its `Raw results` line names exists (a script that closed a section under another name left the
    next run to append a second copy instead of replacing it)."""
    import re

    text = (REPO / "BENCHMARKS.md").read_text()
    begins = re.findall(r"<!-- (.+?):begin -->", text)
    assert begins and sorted(re.findall(r"<!-- (.+?):end -->", text)) == sorted(begins)
    for name in begins:
        begin, end = text.index(f"<!-- {name}:begin -->"), text.index(f"<!-- {name}:end -->")
        assert text.count(f"<!-- {name}:begin -->") == 1 and begin < end
        section = text[begin:end]
        for results in re.findall(r"Raw results: `benchmarks/results/(.+?)`", section):
            assert (REPO / "benchmarks" / "results" / results).exists(), (name, results)
