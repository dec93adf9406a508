"""Zero-shot accuracy through lm-eval 0.4.x, offline from the local files of the data root.

The task YAMLs shipped in atom_lab/tasks/ carry a `@DATA_FILE@` placeholder; `prepare_local_tasks`
writes them with the resolved file paths into an include directory for lm-eval's TaskManager.
PIQA (labels in a separate .lst) and HellaSwag (bz2, 6 lines per item) are first converted to
jsonl in a cache directory keyed by the source files' hashes. With no data root the lm-eval
built-in tasks of the same names are used (they download from the Hugging Face hub).
"""
from __future__ import annotations

import hashlib

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from atom_lab.data import DataError, file_sha256, resolve_data_root
from atom_lab.errors import HarnessError

# Atom's reported metric per task: acc_norm for piqa/arc/hellaswag, acc for boolq/winogrande.
TASK_METRICS = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                "boolq": "acc", "hellaswag": "acc_norm", "winogrande": "acc"}
LOCAL_TASK_PREFIX = "atomlab_"
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "tasks"
PLACEHOLDER = '"@DATA_FILE@"'
SOURCE_FILES = {
    "piqa": ("zeroshot/piqa_valid.jsonl", "zeroshot/piqa_valid_labels.lst"),
    "arc_easy": ("zeroshot/arc_easy.jsonl",),
    "arc_challenge": ("zeroshot/arc_challenge.jsonl",),
    "boolq": ("zeroshot/boolq.jsonl",),
    "hellaswag": ("zeroshot/hellaswag_val.txt.bz2",),
    "winogrande": ("zeroshot/winogrande.jsonl",),
}
HELLASWAG_LINES_PER_ITEM = 6


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atom_lab" / "zeroshot"


def check_tasks(tasks) -> list[str]:
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASK_METRICS]
    if unknown:
        raise HarnessError(f"eval.zeroshot contains {unknown}: allowed tasks {list(TASK_METRICS)}")
    return tasks


def source_files(task: str, root: Path) -> list[Path]:
    """The data-root files `task` reads; DataError naming the missing one."""
    paths = [root / rel for rel in SOURCE_FILES[task]]
    for path in paths:
        if not path.is_file():
            raise DataError(f"missing data file {path} (data.root={root}); eval.zeroshot={task} "
                            f"needs it (see the data README for the format)")
    return paths


def _write_jsonl_atomic(path: Path, records) -> None:
    # parallel sweep jobs may convert the same file at once: write aside, then rename
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def piqa_records(questions: Path, labels: Path) -> list[dict]:
    rows = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line]
    golds = [int(x) for x in labels.read_text().split()]
    if len(rows) != len(golds):
        raise DataError(f"{questions} has {len(rows)} items but {labels} has {len(golds)} labels")
    return [dict(row, label=gold) for row, gold in zip(rows, golds)]


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocessing: WikiHow markers out, double spaces collapsed
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_records(bz2_path: Path) -> list[dict]:
    import bz2

    lines = bz2.open(bz2_path, "rt", encoding="utf-8").read().splitlines()
    if len(lines) % HELLASWAG_LINES_PER_ITEM:
        raise DataError(f"{bz2_path}: {len(lines)} lines is not a multiple of "
                        f"{HELLASWAG_LINES_PER_ITEM} (context, gold, 4 endings per item)")
    records = []
    for i in range(0, len(lines), HELLASWAG_LINES_PER_ITEM):
        context, gold, *endings = lines[i : i + HELLASWAG_LINES_PER_ITEM]
        records.append({"query": _hellaswag_clean(context), "gold": int(gold),
                        "choices": [_hellaswag_clean(e) for e in endings]})
    return records


def task_data_file(task: str, root: Path, cache_dir: Path) -> Path:
    """The jsonl lm-eval reads for `task`: the source file, or its cached conversion."""
    sources = source_files(task, root)
    if task not in ("piqa", "hellaswag"):
        return sources[0]
    key = hashlib.sha256("|".join(file_sha256(f) for f in sources).encode()).hexdigest()[:16]
    converted = cache_dir / f"{task}-{key}.jsonl"
    if not converted.is_file():
        records = piqa_records(*sources) if task == "piqa" else hellaswag_records(sources[0])
        _write_jsonl_atomic(converted, records)
    return converted


def render_task_yaml(task: str, data_file: Path) -> str:
    template = (TEMPLATES_DIR / f"{task}.yaml").read_text(encoding="utf-8")
    if PLACEHOLDER not in template:
        raise HarnessError(f"task template {task}.yaml lacks the {PLACEHOLDER} placeholder")
    return template.replace(PLACEHOLDER, json.dumps(str(data_file)))


def prepare_local_tasks(tasks, data_root, include_dir: Path | None = None,
                        cache_dir: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """Write the task YAMLs for `tasks` with resolved paths -> (include dir, {task: data file})."""
    root = Path(data_root)
    include_dir = Path(include_dir or tempfile.mkdtemp(prefix="atom_lab_tasks_"))
    include_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir or default_cache_dir())
    files = {}
    for task in check_tasks(tasks):
        files[task] = task_data_file(task, root, cache_dir)
        (include_dir / f"{task}.yaml").write_text(render_task_yaml(task, files[task]))
    return include_dir, files


@dataclass
class ZeroShotSetup:
    """What lm-eval runs: its task names mapped back to ours, and the task manager to use."""

    names: dict[str, str]  # lm-eval task name -> our task name
    task_manager: object
    files: dict[str, str]  # local data file -> sha256 ([] with hub tasks)


def setup_tasks(tasks, data_root=None, include_dir=None, cache_dir=None) -> ZeroShotSetup:
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(tasks)
    root = resolve_data_root(data_root)
    if root is None:  # network: lm-eval's own tasks
        return ZeroShotSetup({t: t for t in tasks}, TaskManager(), {})
    include, files = prepare_local_tasks(tasks, root, include_dir, cache_dir)
    hashed = {str(p): file_sha256(p) for t in tasks for p in source_files(t, root)}
    manager = TaskManager(include_path=str(include), include_defaults=False)
    return ZeroShotSetup({LOCAL_TASK_PREFIX + t: t for t in tasks}, manager, hashed)


def zeroshot_metrics(lm_eval_results: dict, names: dict[str, str]) -> dict[str, float]:
    """lm-eval results -> flat {'piqa/acc_norm': .., 'piqa/acc': .., 'avg': ..} (fractions)."""
    metrics = {}
    for lm_name, task in names.items():
        task_results = lm_eval_results[lm_name]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in task_results:
                metrics[f"{task}/{metric}"] = float(task_results[f"{metric},none"])
    reported = [metrics[f"{t}/{TASK_METRICS[t]}"] for t in names.values()]
    metrics["avg"] = sum(reported) / len(reported)
    return metrics


def evaluate_zeroshot(model, tokenizer, tasks, data_root=None, limit: int | None = None,
                      batch_size: int = 8, include_dir=None, cache_dir=None,
                      progress: bool = True) -> dict:
    """Run lm-eval on the in-memory model -> {metrics, files, samples_per_task}."""
    from lm_eval import simple_evaluate

    from atom_lab.eval.lm import InMemoryLM

    setup = setup_tasks(tasks, data_root, include_dir, cache_dir)
    lm = InMemoryLM(model, tokenizer, batch_size=batch_size)
    output = simple_evaluate(model=lm, tasks=list(setup.names), limit=limit,
                             task_manager=setup.task_manager, log_samples=False,
                             bootstrap_iters=0, verbosity="ERROR" if not progress else "WARNING")
    n_samples = {setup.names[k]: v.get("effective", v.get("original"))
                 for k, v in output.get("n-samples", {}).items() if k in setup.names}
    return {"metrics": zeroshot_metrics(output["results"], setup.names), "files": setup.files,
            "samples": n_samples}
