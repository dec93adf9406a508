"""run.py from the command line: one-line user errors without tracebacks, and a joblib sweep
where one failing job does not stop the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=tiny_random", "eval.max_windows=1", "eval.seqlen=64", "progress=false"]


def run_cli(*args, env=None, timeout=240):
    environ = {**os.environ, **(env or {})}
    environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=environ)


@pytest.mark.parametrize("args,expected", [
    (["quant=nope"], "quant=nope is not a preset; allowed quant presets: atom_abl_clip"),
    (["-m", "quant=fp16,nope"], "quant=nope is not a preset"),
    (["quant.grop_size=3"], "quant.grop_size is not a config key"),
    (["quant.group_size=-8", *TINY], "quant.group_size=-8 is not allowed"),
    (["quant=rtn_w4a4", "quant.outliers=4000", *TINY], "quant.outliers=4000 is not allowed"),
    (["quant=fp16", "data.root=/nonexistent/atom", *TINY], "data.root='/nonexistent/atom'"),
    (["model=hf", "model.path=/nonexistent/llama", "quant=fp16"], "model.path='/nonexistent/llama'"),
    (["backend=kernel", "quant=fp16", *TINY], "backend=kernel needs CuPy and an NVIDIA GPU"),
])
def test_user_errors_are_one_line(args, expected):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_debug_shows_the_traceback():
    proc = run_cli("quant.group_size=-8", *TINY, env={"ATOM_LAB_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "quant.group_size=-8" in proc.stderr


def test_help_lists_the_config_groups():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for group in ("model:", "quant:", "eval:", "calib:", "backend:", "logger:"):
        assert group in proc.stdout
    assert "atom_w4a4" in proc.stdout


def test_joblib_sweep_one_results_json_per_job(tmp_path):
    proc = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   f"hydra.sweep.dir={tmp_path}", "quant=rtn_w4a4", "quant.outliers=0,4000", *TINY,
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(tmp_path.glob("*/results.json"))
    assert len(results) == 2
    by_outliers = {json.loads(p.read_text())["config"]["quant"]["outliers"]: json.loads(p.read_text())
                   for p in results}
    assert by_outliers[0]["status"] == "ok" and by_outliers[0]["metrics"]["ppl/wikitext2"] > 1
    assert by_outliers[4000]["status"] == "failed"
    assert "quant.outliers=4000" in by_outliers[4000]["error"]["message"]
    assert "job 1 failed" in proc.stderr
    table = subprocess.run([sys.executable, "experiments/collect.py", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("| rtn_w4a4 |") == 2
