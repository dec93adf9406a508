"""Pipeline and results: validation before the model loads, results.json contents, failures
recorded without raising, W&B offline run holding the metrics."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atom_lab.config import ConfigError, QuantConfig
from atom_lab.data import DataError
from atom_lab.errors import HarnessError, is_user_error, one_line
from atom_lab.pipeline import EvalSettings, plan_experiment, run_and_record
from atom_lab.results import ERROR_FILE, RESULTS_FILE
from atom_lab.tracking import make_tracker, metric_rows, read_offline_summary, run_name

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TINY = ["model=tiny_random", "eval.max_windows=2", "eval.seqlen=64", "progress=false"]


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_atom_w4a4_on_smollm2():
    cfg = make_cfg([])
    assert cfg.model.name == "smollm2_135m" and cfg.backend.name == "fake"
    q = QuantConfig.from_dict(OmegaConf.to_container(cfg.quant))
    assert (q.w_bits, q.a_bits, q.kv_bits, q.group_size, q.outliers) == (4, 4, 4, 128, 128)
    assert (q.outlier_bits, q.a_clip, q.w_clip, q.weight_method, q.w_channel_group) == \
        ("int8", 0.9, 0.85, "gptq", 2)
    assert q.dynamic and q.reorder_metric == "hessian"
    assert cfg.eval.perplexity == ["wikitext2"] and cfg.eval.seqlen == 2048


def test_fp16_preset_holds_every_quant_key_at_its_default():
    # every preset inherits fp16.yaml, so all QuantConfig keys are plain overridable keys
    assert OmegaConf.to_container(make_cfg(["quant=fp16"]).quant) == QuantConfig(name="fp16").to_dict()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml")))
def test_every_quant_preset_validates(preset):
    q = QuantConfig.from_dict(OmegaConf.to_container(make_cfg([f"quant={preset}"]).quant))
    assert q.name == preset
    q.validate_for_model(576, 1536, 64)  # fits SmolLM2


@pytest.mark.parametrize("overrides,error,key", [
    (["quant.group_size=-1"], ConfigError, "quant.group_size=-1"),
    (["quant.outlier_bits=int3"], ConfigError, "quant.outlier_bits"),
    (["eval.zeroshot=[piqa,mmlu]"], HarnessError, "eval.zeroshot"),
    (["eval.perplexity=[]"], HarnessError, "nothing to evaluate"),
    (["eval.max_windows=0"], HarnessError, "eval.max_windows=0"),
    (["calib.nsamples=0"], ConfigError, "calib.nsamples=0"),
    (["device=tpu"], HarnessError, "device='tpu'"),
    (["data.root=/nonexistent/data"], DataError, "data.root"),
])
def test_bad_values_fail_before_the_model_loads(overrides, error, key):
    with pytest.raises(error, match=key.replace("[", r"\[").replace("(", r"\(")) as info:
        plan_experiment(make_cfg(overrides))
    assert is_user_error(info.value)


def test_missing_local_file_fails_in_planning(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    with pytest.raises(DataError, match="wiki.test.raw"):
        plan_experiment(make_cfg([f"data.root={tmp_path}", "quant=fp16"]))


def test_eval_settings_unknown_key():
    with pytest.raises(HarnessError, match="limt"):
        EvalSettings.from_cfg({"perplexity": ["wikitext2"], "zeroshot": [], "limt": 3})


def test_results_json_of_a_tiny_run(tmp_path, data_root):
    overrides = TINY + ["quant=rtn_w4a4"]
    results, failure = run_and_record(make_cfg(overrides), tmp_path, overrides)
    assert failure is None, results["error"]
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert saved["status"] == "ok" and saved["overrides"] == overrides
    assert saved["config"]["quant"]["name"] == "rtn_w4a4"
    assert saved["config"]["data"]["root"] == str(data_root)  # resolved, not ${oc.env:...}
    assert saved["metrics"]["ppl/wikitext2"] > 1.0
    assert saved["details"]["ppl/wikitext2"] == {"nll": pytest.approx(
        __import__("math").log(saved["metrics"]["ppl/wikitext2"])), "tokens": 128, "windows": 2}
    assert {"load_model", "quantize", "ppl/wikitext2", "total"} <= set(saved["timings"])
    assert {"python", "torch", "transformers", "lm_eval"} <= set(saved["versions"])
    assert saved["device"]["type"] == "cpu" and saved["device"]["dtype"] == "float32"
    assert saved["git_sha"] is None or len(saved["git_sha"]) >= 40
    wiki = str((data_root / "wikitext2" / "wiki.test.raw").resolve())
    assert len(saved["data_files"][wiki]) == 64


def test_failed_run_is_recorded_not_raised(tmp_path):
    overrides = TINY + ["quant=rtn_w4a4", "quant.outliers=4000"]  # more than the tiny model has
    results, failure = run_and_record(make_cfg(overrides), tmp_path, overrides)
    assert isinstance(failure, ConfigError) and results["status"] == "failed"
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert "quant.outliers=4000" in saved["error"]["message"]
    assert "Traceback" in saved["error"]["traceback"]
    assert "quant.outliers=4000" in (tmp_path / ERROR_FILE).read_text()
    assert one_line(failure).startswith("error: quant.outliers=4000") and "\n" not in one_line(failure)


def test_run_name_and_table_rows():
    assert run_name(["quant=fp16", "quant.group_size=64", "data.root=/x"]) == \
        "quant=fp16,quant.group_size=64"
    assert run_name([]) == "default"
    rows = metric_rows({"ppl/wikitext2": 9.5, "zeroshot/piqa/acc_norm": 0.6, "zeroshot/avg": 0.6})
    assert rows == [["perplexity", "wikitext2", "ppl", 9.5], ["zeroshot", "avg", "avg", 0.6],
                    ["zeroshot", "piqa", "acc_norm", 0.6]]


def test_wandb_offline_run_dir_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = {"ppl/wikitext2": 12.5, "zeroshot/piqa/acc_norm": 0.625, "zeroshot/avg": 0.625}
    tracker = make_tracker({"name": "wandb", "mode": "offline", "project": "atom-lab-test"},
                           "quant=fp16", {"quant": {"name": "fp16"}}, tmp_path)
    tracker.log_metrics(metrics)
    tracker.log_table(metrics)
    tracker.finish()
    assert tracker.run_dir.parent == tmp_path / "wandb" and tracker.run_dir.name.startswith("offline-run")
    summary = read_offline_summary(tracker.run_dir)
    assert {k: summary[k] for k in metrics} == metrics
    (table,) = (tracker.run_dir / "files" / "media" / "table").glob("*.table.json")
    assert json.loads(table.read_text())["data"][0] == ["perplexity", "wikitext2", "ppl", 12.5]


def test_unknown_logger_and_mode(tmp_path):
    with pytest.raises(HarnessError, match="logger.name='mlflow'"):
        make_tracker({"name": "mlflow"}, "x", {}, tmp_path)
    with pytest.raises(HarnessError, match="logger.mode='cloud'"):
        make_tracker({"name": "wandb", "mode": "cloud"}, "x", {}, tmp_path)
