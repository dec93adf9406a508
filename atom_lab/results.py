"""results.json: one file per run with everything needed to read, compare and reproduce it.

Layout: {status, error?, config (resolved), overrides, metrics (flat map, e.g. `ppl/wikitext2`,
`zeroshot/piqa/acc_norm`, `zeroshot/avg`), details (per-dataset token counts, ...), timings (s),
quant_summary, device, versions, git_sha, data_files (path -> sha256), started, finished}.
"""
from __future__ import annotations

import json
import platform
import subprocess
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS_FILE = "results.json"
ERROR_FILE = "error.txt"
TRACKED_PACKAGES = ("torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "wandb",
                    "gguf", "cupy-cuda12x", "cupy-cuda13x", "numpy", "datasets")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha(repo: Path | None = None) -> str | None:
    """The checkout's commit (suffixed `-dirty` with uncommitted changes), or None outside git."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value):
    """Tensors, paths, dtypes and numpy scalars -> plain JSON values (recursively)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def error_record(exc: BaseException) -> dict:
    return {"type": exc.__class__.__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}


def write_results(output_dir: Path, results: dict) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RESULTS_FILE
    path.write_text(json.dumps(to_jsonable(results), indent=2, sort_keys=False) + "\n")
    if results.get("error"):
        error = results["error"]
        (output_dir / ERROR_FILE).write_text(f"{error['type']}: {error['message']}\n\n"
                                             f"{error['traceback']}")
    return path


def load_results(path: Path) -> dict:
    path = Path(path)
    return json.loads((path / RESULTS_FILE if path.is_dir() else path).read_text())


def find_results(sweep_dir: Path) -> list[Path]:
    """Every results.json under a run or sweep directory, in job order."""
    root = Path(sweep_dir)
    return sorted(root.rglob(RESULTS_FILE),
                  key=lambda p: _job_sort_key(p.relative_to(root).parts[0]))


def _job_sort_key(name: str):
    head = name.split("_", 1)[0]
    return (0, int(head), name) if head.isdigit() else (1, 0, name)
