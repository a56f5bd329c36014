"""`optimum-agentos distill` end to end on the real all-MiniLM-L6-v2 (short run), and its argument checks."""

import json
import subprocess
import sys

import pytest

from optimum_agentos.distillation.command import run_distill

from ..conftest import REPO, run_python


@pytest.mark.parametrize("argv, message", [
    (["--task", "mnli", "--student_layers", "3"], "unknown task 'mnli'"),
    (["--task", "sst2"], "exactly one of --student"),
    (["--task", "sst2", "--student", "x", "--student_layers", "3"], "exactly one of --student"),
])
def test_distill_command_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run_distill(argv + ["--output_dir", str(tmp_path / "o"), "--report_to", "none"])


def test_distill_command_refuses_a_folder_of_user_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="keep.txt"):
        run_distill(["--task", "sst2", "--student_layers", "3", "--output_dir", str(tmp_path), "--report_to", "none"])
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_sst2_student_from_minilm_trains_saves_card_and_reloads(tmp_path):
    out = tmp_path / "student"
    proc = subprocess.run(
        [sys.executable, "-m", "optimum_agentos.cli", "distill", "--teacher", "minilm-l6", "--task", "sst2",
         "--student_layers", "3", "--teacher_finetune_steps", "30", "--max_train_samples", "2000", "--max_steps", "30",
         "--per_device_train_batch_size", "32", "--learning_rate", "1e-4", "--output_dir", str(out),
         "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"],
        capture_output=True, text=True, cwd=REPO, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "agentos_summary.json").read_text())
    assert summary["steps"] == 30 and summary["student_params"] < 0.8 * summary["teacher_params"]
    assert summary["teacher"] > 0.6  # 30 steps of fine-tuning already beat chance (0.51) clearly (0.76 here)
    card = (out / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "- distillation" in card
    assert str(tmp_path) not in card
    printed = run_python(f"""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
        from optimum_agentos.distillation.tasks import accuracy, classification_dataset
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r})
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        dev = classification_dataset(tok, "sst2", "validation", 64)
        print(model.config.num_hidden_layers, round(accuracy(model, dev, DataCollatorWithPadding(tok)), 4))
    """)
    layers, acc = printed.split()
    assert layers == "3" and float(acc) == summary["student_after"]
