"""atom-lab experiment entry point (Hydra 1.3).

    python run.py                                   # Atom W4A4 on SmolLM2, WikiText-2 perplexity
    python run.py -m quant=fp16,atom_w4a4 quant.outliers=0,64,128
    python run.py --help                            # config groups and keys

Each run writes results.json into its Hydra output dir. Bad input (an unknown preset or key, an
impossible quantizer setting, a missing data file or model) is reported as one line, exit code 2;
ATOM_LAB_DEBUG=1 or debug=true shows the traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from atom_lab.errors import (USER_ERROR_EXIT_CODE, debug_requested, is_user_error, one_line,
                             with_debug_hint)

CONF_DIR = Path(__file__).resolve().parent / "conf"
# flags after which precheck cannot know which config is composed: leave errors to Hydra
CUSTOM_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                       "--experimental-rerun")


def config_groups() -> dict[str, list[str]]:
    """Our config groups (conf/<group>/*.yaml, not hydra/) -> their options."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and d.name != "hydra"}


def _override_values(override) -> list[str]:
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # glob(...) and other sweeps that need the options: checked by Hydra
            return []
    return [override.get_value_element_as_str()]


def _first_job_overrides(parsed) -> list[str]:
    first = []
    for override in parsed:
        values = _override_values(override) if override.value_type is not None else [None]
        if not values:
            continue
        key = override.get_key_element()
        first.append(key if values[0] is None else f"{key}={values[0]}")
    return first


def precheck(argv: list[str]) -> str | None:
    """Catch composition errors (unknown preset, key, bad syntax) before Hydra prints a stack:
    returns one line naming the key and the fix, or None when the command line composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        return f"error: cannot parse the command line: {one_line(exc).removeprefix('error: ')}"
    groups = config_groups()
    for override in parsed:
        group = override.key_or_group
        if group in groups and override.package is None and not override.is_delete():
            for value in _override_values(override):
                if value not in groups[group]:
                    return (f"error: {group}={value} is not a preset; allowed {group} presets: "
                            f"{', '.join(groups[group])} (conf/{group}/*.yaml)")
    if any(a.split("=")[0] in CUSTOM_CONFIG_FLAGS for a in argv):
        return None
    return _compose_check(_first_job_overrides(parsed))


def _compose_check(overrides: list[str]) -> str | None:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as exc:
        key = getattr(exc.__cause__, "full_key", None)
        if key and "not in struct" in str(exc.__cause__):
            return (f"error: {key} is not a config key; the keys are listed by "
                    f"`python run.py --help`")
        return " ".join(one_line(exc).split())
    return None


def _report_failure(results: dict, failure: Exception, multirun: bool, debug: bool) -> None:
    line = one_line(failure) if is_user_error(failure) else \
        f"error: {failure.__class__.__name__}: {failure}"
    if multirun:  # the other jobs go on; the error is in this job's results.json / error.txt
        job = HydraConfig.get().job.num
        print(f"job {job} failed ({', '.join(results['overrides']) or 'defaults'}): {line}",
              file=sys.stderr)
        return
    if debug or not is_user_error(failure):
        os.environ["HYDRA_FULL_ERROR"] = "1"
        raise failure
    print(with_debug_hint(line), file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def _print_summary(results: dict, output_dir: Path) -> None:
    for key, value in results["metrics"].items():
        detail = results["details"].get(key, {})
        extra = f" ({detail['windows']} windows, {detail['tokens']} tokens)" if "tokens" in detail \
            else ""
        print(f"{key} = {value:.4f}{extra}")
    print(f"total {results['timings'].get('total', 0):.1f} s; results: {output_dir / 'results.json'}")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from atom_lab.pipeline import run_and_record

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    results, failure = run_and_record(cfg, output_dir, overrides)
    if failure is not None:
        _report_failure(results, failure, multirun, debug_requested(cfg.get("debug", False)))
        return
    _print_summary(results, output_dir)


if __name__ == "__main__":
    argv = sys.argv[1:]
    wants_debug = debug_requested("debug=true" in argv)
    problem = None if wants_debug or any(a in ("--help", "-h", "--hydra-help") for a in argv) \
        else precheck(argv)
    if problem:
        print(with_debug_hint(problem), file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    main()
