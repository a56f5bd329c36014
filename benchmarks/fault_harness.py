"""The machinery of `benchmarks/reliability.py`: fault hooks installed in a child process (its Nth call of a
wrapped function SIGKILLs the child, or raises ENOSPC), the operations the child runs (quantize, prune, save, push,
distill), and the invariants the parent checks after a kill. The child is `python benchmarks/fault_harness.py
--child JOB`."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Files of the user beside the checkpoint folder: they must never change.
USER_FILES = {
    "notes.txt": b"my notes\n",
    "data/table.csv": b"a,b\n1,2\n",
    ".ckpt.mine/keep.txt": b"a hidden folder whose name starts like the checkpoint's\n",
    "ckpt-old/model.safetensors": b"not ours: a folder with a similar name\n",
}
SAVE_NAME = "ckpt"


# ---------------------------------------------------------------------------------------------------- fault hooks


def _resolve(target: str):
    """'package.module:Attr.path' -> (owner object, attribute name)."""
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


def _fire(action: str):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL cannot be caught
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def install_fault(target: str, n: int, when: str = "before", action: str = "kill"):
    """Make the `n`th call of `target` SIGKILL this process (or raise ENOSPC with action='enospc'), `when` 'before'
    or 'after' the real call. Special targets: 'open-write' (files opened for writing: `open`, `Path.write_*`),
    'socket-bytes' (kill once `n` bytes were sent on sockets, cutting the last send at exactly `n`). Returns a
    function that removes the hook."""
    calls = [0]
    if target == "socket-bytes":
        import socket

        original_send, original_sendall = socket.socket.send, socket.socket.sendall

        def limited(real, sock, data, *args):
            view = memoryview(data).cast("B")
            left = n - calls[0]
            if len(view) >= left:
                if left > 0:
                    original_sendall(sock, view[:left])
                calls[0] = n
                _fire(action)
            calls[0] += len(view)
            return real(sock, data, *args)

        socket.socket.send = lambda sock, data, *a: limited(original_send, sock, data, *a)
        socket.socket.sendall = lambda sock, data, *a: limited(original_sendall, sock, data, *a)

        def restore():
            socket.socket.send, socket.socket.sendall = original_send, original_sendall

        restore.calls = calls
        return restore
    if target == "open-write":
        import builtins
        import io

        real_open = builtins.open

        def opener(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if writing:
                calls[0] += 1
            hit = writing and calls[0] == n
            if hit and when == "before":
                _fire(action)
            handle = real_open(file, mode, *args, **kwargs)
            if hit and when == "after":  # the file exists, empty: as if killed while writing it
                handle.flush()
                _fire(action)
            return handle

        builtins.open = io.open = opener

        def restore():
            builtins.open = io.open = real_open

        return restore

    owner, attr = _resolve(target)
    static = inspect.getattr_static(owner, attr)
    func = getattr(owner, attr)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == n
        if hit and when == "before":
            _fire(action)
        result = func(*args, **kwargs)
        if hit and when == "after":
            _fire(action)
        return result

    if isinstance(owner, type) and isinstance(static, (classmethod, staticmethod)):
        setattr(owner, attr, staticmethod(wrapper))  # `func` is already bound to the class
    else:
        setattr(owner, attr, wrapper)
    return lambda: setattr(owner, attr, static)


@contextlib.contextmanager
def fault(target: str, n: int, when: str = "before", action: str = "enospc"):
    """`install_fault` for the duration of a block (for in-process ENOSPC injection)."""
    restore = install_fault(target, n, when, action)
    try:
        yield
    finally:
        restore()


# ------------------------------------------------------------------------------------------------ the operations


def tiny_tokenizer():
    """A 128-token word-level fast tokenizer (its files make the tokenizer-writing kill points real)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{f"t{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<s>")


def calibration_ids():
    import torch

    return torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(3))


def run_operation(op: str, save_dir: str, seed: int = 1, extra: dict | None = None):
    """The operations under test, the same in the child and in the parent's own (recovery) saves."""
    extra = extra or {}
    from optimum_agentos import AgentOSConfig, Pruner, PruningConfig
    from optimum_agentos.quantization.quantizer import Quantizer

    from tests.conftest import build_tiny

    if op == "rtn":
        Quantizer(build_tiny("llama", seed=seed), tokenizer=tiny_tokenizer()).quantize(
            save_dir, AgentOSConfig(bits=4, group_size=64))
    elif op == "gptq":
        Quantizer(build_tiny("llama", seed=seed), tokenizer=tiny_tokenizer()).quantize(
            save_dir, AgentOSConfig(bits=4, group_size=64, method="gptq"), calibration_dataset=calibration_ids(),
            num_samples=8, seq_len=32)
    elif op == "prune":
        Pruner(build_tiny("llama", seed=seed), tokenizer=tiny_tokenizer()).prune(
            save_dir, PruningConfig(method="magnitude", sparsity=0.5))
    elif op == "save":  # a float model through save_model_folder, keeping a Trainer's checkpoint-* folders
        from optimum_agentos.formats.folder import save_model_folder
        from optimum_agentos.hub.card import write_card

        save_model_folder(build_tiny("llama", seed=seed), tiny_tokenizer(), save_dir,
                          extra=lambda d: write_card(d, {"base_model": "tiny"}),
                          carry_over=lambda name: name.startswith("checkpoint-"))
    elif op == "push":
        from optimum_agentos.hub.push import push_folder

        push_folder(save_dir, extra["repo_id"])
    elif op == "distill":
        distill_run(save_dir, resume=extra.get("resume"))
    else:
        raise ValueError(op)


def distill_run(out: str, resume=None, max_steps: int = 6):
    """The setup of tests/distillation/test_trainer.py's resume test: checkpoints every 3 steps, linear schedule."""
    from optimum_agentos.distillation import DistillationTrainer, make_student

    from tests.distillation.test_trainer import args, classification_data, tiny_bert

    teacher = tiny_bert(4)
    student = make_student(teacher, num_layers=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=classification_data(teacher),
        args=args(Path(out).parent, output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=3,
                  per_device_train_batch_size=4, lr_scheduler_type="linear"),
    )
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.clone() for k, v in student.state_dict().items()}


def quiet() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)  # parent and children: the same kernels, bit-identical logits
    hf_logging.disable_progress_bar()


def child_main(job: dict) -> None:
    quiet()
    if job.get("no_exchange"):
        from optimum_agentos.formats import folder

        folder._EXCHANGE = None  # the two-rename fallback of filesystems without renameat2
    restore = install_fault(**job["fault"]) if job.get("fault") else None
    print("READY", flush=True)
    run_operation(job["op"], job["save_dir"], job.get("seed", 1), job.get("extra"))
    print("DONE", flush=True)
    if restore is not None and hasattr(restore, "calls"):
        print(f"SENT {restore.calls[0]}", flush=True)


def start_child(job: dict, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def run_child(job: dict, env: dict | None = None, kill_after: float | None = None, timeout: int = 300):
    """Run a child to its end (or SIGKILL it `kill_after` seconds after it printed READY).
    Returns (rc, stderr, stdout)."""
    proc = start_child(job, env)
    if kill_after is not None:
        line = proc.stdout.readline()
        if line.strip() == "READY":
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, err, out


# ------------------------------------------------------------------------------------------------- the invariants


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_user_files(parent: Path) -> None:
    for name, data in USER_FILES.items():
        (parent / name).parent.mkdir(parents=True, exist_ok=True)
        (parent / name).write_bytes(data)


def user_files_intact(parent: Path) -> bool:
    return all((parent / n).is_file() and (parent / n).read_bytes() == d for n, d in USER_FILES.items())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".agentos-tmp" in p.name or ".agentos-old" in p.name)


def logits_of(folder: Path):
    """Logits of the checkpoint in `folder` loaded with plain `from_pretrained` (after the import), on fixed ids."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_agentos  # noqa: F401

    from tests.conftest import sample_ids

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def checkpoint_state(folder: Path, known: dict) -> str:
    """Which known checkpoint `folder` holds, complete ('old' / 'new' / ...), or what is wrong with it."""
    import torch

    from optimum_agentos.formats.checks import check_safetensors
    from optimum_agentos.formats.folder import MANIFEST

    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"no manifest ({err})"
    on_disk = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.name != MANIFEST}
    if on_disk != manifest:
        return f"files differ from the manifest: {sorted(set(on_disk) ^ set(manifest))}"
    try:
        for path in folder.glob("*.safetensors"):
            check_safetensors(path)
        logits = logits_of(folder)
    except Exception as err:  # noqa: BLE001  (any failure to load is the finding)
        return f"does not load: {type(err).__name__}: {err}"
    for name, expected in known.items():
        if torch.equal(logits, expected):
            return name
    return "loads but its logits match no known checkpoint"


@dataclass
class Result:
    category: str
    case: str
    ok: bool
    detail: str = ""
    lost_data: bool = False
    silent_load: bool = False
    no_message: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class Workspace:
    """A parent folder with the user's files, an old checkpoint in `ckpt` and the logits each known checkpoint
    gives (old: seed 0 RTN, written by this process; new: the operation's, from a clean child run)."""

    def __init__(self, root: Path, op: str, references: dict, name: str = SAVE_NAME, symlink: bool = False):
        self.parent = root
        self.parent.mkdir(parents=True, exist_ok=True)
        write_user_files(self.parent)
        self.save_dir = self.parent / name
        real = self.save_dir
        if symlink:  # `name` is a link to the real folder beside it, as users do to switch versions
            os.symlink(f"{name}-real", self.save_dir)
            real = self.parent / f"{name}-real"
        self.known = {"old": references["old"]}
        if op in references:  # without it (a kill before the switch) only the old checkpoint is acceptable
            self.known["new"] = references[op]
        shutil.copytree(references["old_folder"], real)
        self.before = tree_digest(self.save_dir)


def make_references(root: Path, ops) -> dict:
    """The old checkpoint (RTN of seed 0, saved here) and, per operation, the new one from an uninterrupted child."""
    refs = {"old_folder": root / "old" / SAVE_NAME}
    run_operation("rtn", str(refs["old_folder"]), seed=0)
    refs["old"] = logits_of(refs["old_folder"])
    for op in ops:
        folder = root / f"ref-{op}" / SAVE_NAME
        rc, err, _ = run_child({"op": op, "save_dir": str(folder), "seed": 1})
        if rc != 0:
            raise RuntimeError(f"the uninterrupted {op} run failed:\n{err[-3000:]}")
        refs[op] = logits_of(folder)
    return refs


def check_after_kill(ws: Workspace, rc: int, err: str, op: str, allow_missing: bool = False,
                     next_op: str = "rtn") -> tuple[bool, str, bool]:
    """The invariants after a killed operation. Returns (ok, detail, lost_data)."""
    from optimum_agentos.formats.folder import recover_interrupted_save

    notes = []
    if rc != -signal.SIGKILL:
        return False, f"the child was not killed (rc {rc}): {err[-500:]}", False
    state = checkpoint_state(ws.save_dir, ws.known)
    if state == "missing" and allow_missing:  # the two-rename fallback between its renames: recovery restores
        recover_interrupted_save(ws.save_dir)
        state = checkpoint_state(ws.save_dir, ws.known)
        notes.append("restored by recover_interrupted_save")
    lost = state not in ("old", "new") or not user_files_intact(ws.parent)
    if state == "old" and tree_digest(ws.save_dir) != ws.before:
        lost, state = True, "old checkpoint changed on disk"
    notes.append(f"after the kill: {state}")
    try:
        run_operation(next_op, str(ws.save_dir), seed=2)
    except Exception as error:  # noqa: BLE001
        return False, "; ".join(notes + [f"the next save failed: {type(error).__name__}: {error}"]), lost
    left = leftovers(ws.parent)
    if left:
        return False, "; ".join(notes + [f"left over after the next save: {left}"]), lost
    if not user_files_intact(ws.parent):
        return False, "; ".join(notes + ["user files changed"]), True
    return not lost, "; ".join(notes), lost


if __name__ == "__main__":
    child_main(json.loads(sys.argv[sys.argv.index("--child") + 1]))
