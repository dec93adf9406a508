"""Experiment tracking: W&B (offline by default: no account, no network) or nothing.

`logger=wandb` logs the resolved config, the flat metrics, and a per-task table (one row per
perplexity dataset / zero-shot task) into <run dir>/wandb/. `logger.mode=online` syncs to the
W&B server for users with an account; `wandb sync <run dir>/wandb/offline-run-*` uploads an
offline run later. `logger=none` disables tracking.
"""
from __future__ import annotations

from pathlib import Path

from atom_lab.errors import HarnessError

WANDB_MODES = ("offline", "online", "disabled")
NAME_MAX_CHARS = 128
# the .wandb file: a 7-byte header, then LevelDB-log records (7-byte header each) in 32 KiB blocks
WANDB_FILE_HEADER = 7
LOG_BLOCK = 32768
LOG_RECORD_HEADER = 7
LOG_FULL, LOG_FIRST, LOG_MIDDLE, LOG_LAST = 1, 2, 3, 4


def run_name(overrides: list[str], default: str = "default") -> str:
    """A readable run name from the Hydra overrides, e.g. `quant=atom_w4a4,quant.group_size=64`."""
    shown = [o for o in overrides if not o.startswith(("hydra", "logger", "data.root"))]
    return ",".join(shown)[:NAME_MAX_CHARS] or default


def metric_rows(metrics: dict[str, float]) -> list[list]:
    """Flat metrics -> [kind, item, metric, value] rows for the per-task table."""
    rows = []
    for key, value in sorted(metrics.items()):
        parts = key.split("/")
        if parts[0] == "ppl" and len(parts) == 2:
            rows.append(["perplexity", parts[1], "ppl", value])
        elif parts[0] == "zeroshot" and len(parts) == 3:
            rows.append(["zeroshot", parts[1], parts[2], value])
        elif parts[0] == "zeroshot" and len(parts) == 2:
            rows.append(["zeroshot", parts[1], "avg", value])
    return rows


class Tracker:
    """No tracking (logger=none); the interface the W&B tracker fills in."""

    run_dir: Path | None = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def log_table(self, metrics: dict[str, float]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, logger_cfg, name: str, config: dict, output_dir: Path):
        import wandb

        mode = logger_cfg.get("mode", "offline")
        if mode not in WANDB_MODES:
            raise HarnessError(f"logger.mode={mode!r} is not allowed: one of {list(WANDB_MODES)}")
        self._wandb = wandb
        directory = Path(logger_cfg.get("dir") or output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=logger_cfg.get("project", "atom-lab"),
                               entity=logger_cfg.get("entity"), group=logger_cfg.get("group"),
                               tags=list(logger_cfg.get("tags") or []), name=name, config=config,
                               mode=mode, dir=str(directory), reinit="finish_previous",
                               settings=wandb.Settings(console="off", silent=True))
        self.run_dir = Path(self._run.dir).parent if mode != "disabled" else None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._run.log(dict(metrics))

    def log_table(self, metrics: dict[str, float]) -> None:
        rows = metric_rows(metrics)
        if rows:
            table = self._wandb.Table(columns=["kind", "item", "metric", "value"], data=rows)
            self._run.log({"results_table": table})

    def finish(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def make_tracker(logger_cfg, name: str, config: dict, output_dir: Path) -> Tracker:
    kind = (logger_cfg or {}).get("name", "none")
    if kind == "none":
        return Tracker()
    if kind == "wandb":
        return WandbTracker(logger_cfg, name, config, output_dir)
    raise HarnessError(f"logger.name={kind!r} is not allowed: none or wandb (logger=none|wandb)")


def _wandb_log_payloads(data: bytes):
    pos, pieces = WANDB_FILE_HEADER, []
    while pos + LOG_RECORD_HEADER <= len(data):
        left = LOG_BLOCK - pos % LOG_BLOCK
        if left < LOG_RECORD_HEADER:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + LOG_RECORD_HEADER : pos + LOG_RECORD_HEADER + length]
        pos += LOG_RECORD_HEADER + length
        if kind == LOG_FULL:
            yield payload
        elif kind in (LOG_FIRST, LOG_MIDDLE):
            pieces = ([] if kind == LOG_FIRST else pieces) + [payload]
        elif kind == LOG_LAST:
            yield b"".join(pieces + [payload])


def read_offline_summary(run_dir: Path, wait_s: float = 30.0) -> dict:
    """The summary metrics stored in an offline W&B run directory (offline-run-*/run-*.wandb),
    read without syncing. W&B's writer process may still be flushing right after finish(): wait
    up to `wait_s` seconds for the run's exit record."""
    import json
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        summary, finished = {}, False
        for path in sorted(Path(run_dir).glob("run-*.wandb")):
            for payload in _wandb_log_payloads(path.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                kind = record.WhichOneof("record_type")
                finished |= kind == "exit"
                if kind == "summary":
                    for item in record.summary.update:
                        summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if finished or time.monotonic() > deadline:
            return summary
        time.sleep(0.2)
