"""One experiment, config to results: validate -> load model -> calibrate -> quantize -> evaluate.

`run_experiment(cfg, output_dir, overrides)` raises on failure; `run_and_record` never does for an
ordinary exception: it writes results.json (with the error, message and traceback, when the run
failed) and returns it, so that one failing job of a sweep does not stop the others.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from atom_lab.config import CalibConfig, ConfigError, QuantConfig
from atom_lab.data import resolve_data_root
from atom_lab.errors import HarnessError
from atom_lab.results import (error_record, git_sha, now_iso, package_versions, write_results)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("fake", "kernel")
CUDA_PPL_BATCH = 8


@dataclass
class EvalSettings:
    perplexity: list[str]
    zeroshot: list[str]
    split: str = "test"
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int | None = None
    limit: int | None = None
    zeroshot_batch_size: int = 16

    @classmethod
    def from_cfg(cls, eval_cfg) -> "EvalSettings":
        from atom_lab.eval.perplexity import PPL_DATASETS
        from atom_lab.eval.zeroshot import check_tasks

        d = OmegaConf.to_container(eval_cfg, resolve=True) if isinstance(eval_cfg, DictConfig) \
            else dict(eval_cfg)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise HarnessError(f"unknown eval key(s) {unknown}; allowed: "
                               f"{sorted(cls.__dataclass_fields__)}")
        settings = cls(**d)
        settings.perplexity = _as_list("eval.perplexity", settings.perplexity)
        settings.zeroshot = check_tasks(_as_list("eval.zeroshot", settings.zeroshot))
        bad = [name for name in settings.perplexity if name not in PPL_DATASETS]
        if bad:
            raise HarnessError(f"eval.perplexity contains {bad}: allowed {list(PPL_DATASETS)}")
        for key in ("seqlen", "max_windows", "batch_size", "limit", "zeroshot_batch_size"):
            value = getattr(settings, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise HarnessError(f"eval.{key}={value!r} is not allowed: a positive integer"
                                   + ("" if key in ("seqlen", "zeroshot_batch_size") else " or null"))
        if not settings.perplexity and not settings.zeroshot:
            raise HarnessError("eval.perplexity and eval.zeroshot are both empty: nothing to evaluate")
        return settings


def _as_list(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise HarnessError(f"{key}={value!r} is not allowed: a list such as [wikitext2]")
    return [str(v) for v in value]


def resolve_device(value: str) -> torch.device:
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise HarnessError(f"device={value!r} is not allowed: auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device={value!r} but no CUDA GPU is visible: use device=cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise HarnessError(f"device={value!r} is not allowed: auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(value: str, device: torch.device) -> torch.dtype:
    if value in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if value not in DTYPES:
        raise HarnessError(f"dtype={value!r} is not allowed: auto or one of {sorted(DTYPES)}")
    return DTYPES[value]


@dataclass
class Plan:
    """Everything validated before the model loads."""

    quant: QuantConfig
    calib: CalibConfig
    evals: EvalSettings
    device: torch.device
    dtype: torch.dtype
    data_root: Path | None
    backend: str
    model_cfg: dict
    kernel_strict: bool = True  # backend=kernel: unsupported shapes raise (false: stay fake-quant)
    data_files: dict[str, str] = field(default_factory=dict)


def plan_experiment(cfg: DictConfig) -> Plan:
    """Validate every key that can be checked without the model (fails fast, names the key)."""
    quant = QuantConfig.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
    calib_dict = OmegaConf.to_container(cfg.calib, resolve=True)
    unknown = sorted(set(calib_dict) - set(CalibConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown calib key(s) {unknown}; allowed: "
                          f"{sorted(CalibConfig.__dataclass_fields__)}")
    calib = CalibConfig(**calib_dict).validate()
    evals = EvalSettings.from_cfg(cfg.eval)
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    backend = cfg.backend.name
    if backend not in BACKENDS:
        raise HarnessError(f"backend.name={backend!r} is not allowed: backend=fake or backend=kernel")
    if backend == "kernel":
        from atom_lab.cuda import require_kernel_backend

        require_kernel_backend()
    data_root = resolve_data_root(cfg.data.root)
    plan = Plan(quant, calib, evals, device, dtype, data_root, backend,
                OmegaConf.to_container(cfg.model, resolve=True),
                kernel_strict=bool(cfg.backend.get("strict", True)))
    plan.data_files = check_data_files(plan)
    return plan


def check_data_files(plan: Plan) -> dict[str, str]:
    """Fail before the model loads when a needed local data file is missing; -> {path: sha256}."""
    from atom_lab.data import WIKITEXT2_FILES, data_file, file_sha256
    from atom_lab.eval.perplexity import local_files
    from atom_lab.eval.zeroshot import source_files

    if plan.data_root is None:
        return {}
    paths = [p for d in plan.evals.perplexity for p in local_files(d, plan.data_root,
                                                                   plan.evals.split)]
    paths += [p for t in plan.evals.zeroshot for p in source_files(t, plan.data_root)]
    if plan.quant.needs_calibration:
        if plan.calib.split not in WIKITEXT2_FILES:
            raise ConfigError(f"calib.split={plan.calib.split!r} is not allowed: one of "
                              f"{sorted(WIKITEXT2_FILES)}")
        paths.append(data_file(plan.data_root, WIKITEXT2_FILES[plan.calib.split]))
    return {str(p): file_sha256(p) for p in dict.fromkeys(paths)}


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def model_id(model_cfg: dict) -> str:
    return json.dumps({k: v for k, v in sorted(model_cfg.items()) if k != "dtype"}, sort_keys=True)


def load_and_quantize(plan: Plan, timer: Timer, progress: bool):
    """-> (model, tokenizer, quantize_model summary) with the configured backend in place."""
    from atom_lab.models import load_model, model_dims

    with timer("load_model"):
        model, tokenizer = load_model(plan.model_cfg, plan.device, plan.dtype)
    if tokenizer is None:
        raise HarnessError(f"model.name={plan.model_cfg.get('name')!r} has no tokenizer, so it "
                           f"cannot be evaluated; use it for kernel benchmarks only")
    plan.quant.validate_for_model(*model_dims(model))
    summary: dict = {}
    q = plan.quant
    if q.quantizes_weights or q.quantizes_activations or q.quantizes_kv:
        summary = quantize(model, tokenizer, plan, timer, progress)
    if plan.backend == "kernel":
        from atom_lab.kernel_linear import convert_to_kernel_backend

        with timer("kernel_convert"):
            kernel = convert_to_kernel_backend(model, plan.quant, strict=plan.kernel_strict)
        summary["kernel"] = {"converted": len(kernel["converted"]), "skipped": kernel["skipped"]}
    return model, tokenizer, summary


def quantize(model, tokenizer, plan: Plan, timer: Timer, progress: bool) -> dict:
    from atom_lab.calibration import (calibration_cache_key, calibration_data_hash,
                                      calibration_windows_for)
    from atom_lab.quantize import quantize_model

    windows, cache_key = None, None
    if plan.quant.needs_calibration:
        with timer("calibration_windows"):
            windows = calibration_windows_for(tokenizer, plan.calib, plan.data_root)
        cache_key = calibration_cache_key(model_id(plan.model_cfg),
                                          calibration_data_hash(plan.calib, plan.data_root),
                                          plan.calib.nsamples, plan.calib.seqlen, plan.calib.seed)
    with timer("quantize"):
        summary = quantize_model(model, plan.quant, windows, device=plan.device, progress=progress,
                                 cache_key=cache_key, cache_dir=plan.calib.cache_dir)
    return summary or {}


def evaluate(model, tokenizer, plan: Plan, timer: Timer, progress: bool, output_dir: Path):
    """-> (flat metrics, details)."""
    from atom_lab.eval.perplexity import evaluate_perplexity

    metrics, details = {}, {}
    evals = plan.evals
    ppl_batch = evals.batch_size or (CUDA_PPL_BATCH if plan.device.type == "cuda" else 1)
    for dataset in evals.perplexity:
        with timer(f"ppl/{dataset}"):
            result = evaluate_perplexity(model, tokenizer, [dataset], plan.data_root, evals.split,
                                         evals.seqlen, evals.max_windows, ppl_batch,
                                         progress)[dataset]
        metrics[f"ppl/{dataset}"] = result["ppl"]
        details[f"ppl/{dataset}"] = {k: result[k] for k in ("nll", "tokens", "windows")}
    if evals.zeroshot:
        from atom_lab.eval.zeroshot import evaluate_zeroshot

        with timer("zeroshot"):
            result = evaluate_zeroshot(model, tokenizer, evals.zeroshot, plan.data_root,
                                       evals.limit, evals.zeroshot_batch_size,
                                       include_dir=output_dir / "lm_eval_tasks", progress=progress)
        metrics.update({f"zeroshot/{k}": v for k, v in result["metrics"].items()})
        details["zeroshot/samples"] = result["samples"]
    return metrics, details


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def run_experiment(cfg: DictConfig, output_dir: Path, overrides: list[str], results: dict) -> dict:
    """Fill `results` (so a failure keeps what was done) and return it; raises on failure."""
    progress = bool(cfg.get("progress", True))
    timer = Timer()
    results["timings"] = timer.seconds
    torch.manual_seed(int(cfg.get("seed", 0)))
    with timer("total"):
        plan = plan_experiment(cfg)
        results["device"] = dict(device_info(plan.device), device=str(plan.device))
        results["data_files"] = plan.data_files
        model, tokenizer, summary = load_and_quantize(plan, timer, progress)
        results["quant_summary"] = summary
        results["device"]["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        metrics, details = evaluate(model, tokenizer, plan, timer, progress, output_dir)
    results["metrics"] = metrics
    results["details"] = details
    results["status"] = "ok"
    return results


def new_results(cfg: DictConfig, overrides: list[str]) -> dict:
    return {"status": "running", "error": None,
            "config": OmegaConf.to_container(cfg, resolve=False),
            "overrides": list(overrides), "metrics": {}, "details": {}, "timings": {},
            "quant_summary": {}, "device": {}, "versions": package_versions(),
            "git_sha": git_sha(), "data_files": {}, "started": now_iso(), "finished": None}


def run_and_record(cfg: DictConfig, output_dir: Path, overrides: list[str], tracker_factory=None):
    """Run one experiment and write results.json; returns (results, exception or None)."""
    from atom_lab.tracking import make_tracker, run_name

    output_dir = Path(output_dir)
    results = new_results(cfg, overrides)
    try:
        results["config"] = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable interpolation is reported by run_experiment below
        pass
    tracker, failure = None, None
    try:
        factory = tracker_factory or make_tracker
        tracker = factory(cfg.get("logger"), run_name(overrides), results["config"], output_dir)
        run_experiment(cfg, output_dir, overrides, results)
        tracker.log_metrics(results["metrics"])
        tracker.log_table(results["metrics"])
    except Exception as exc:  # recorded, then reported by the caller (one line for user errors)
        results["status"] = "failed"
        results["error"] = error_record(exc)
        failure = exc
    finally:
        results["finished"] = now_iso()
        if tracker is not None:
            results["wandb_dir"] = str(tracker.run_dir) if tracker.run_dir else None
            tracker.finish(failed=failure is not None)
        write_results(output_dir, results)
    return results, failure

