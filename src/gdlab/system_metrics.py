"""MLflow's system metrics on a run (opt-in, `tracking.system_metrics=true`): CPU, memory, disk and
network, and GPU where MLflow finds one, as `system/...` metrics in the run's "System metrics" charts.

MLflow's own `SystemMetricsMonitor`, a thread of this process sampling every
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default: 10), is started when a single run or a
sweep's parent run is created and stopped (its last samples written) before that run ends.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

_MONITORS: dict[str, object] = {}  # run id -> its monitor


def start(cfg: DictConfig, uri: str, run_id: str) -> None:
    if not cfg.tracking.get("system_metrics"):
        return
    from mlflow.environment_variables import (
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
    )
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its started/stopped INFO lines
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10,
        samples_before_logging=MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING.get() or 1,
        tracking_uri=uri,
    )
    monitor.start()
    _MONITORS[run_id] = monitor


def stop(run_id: str) -> None:
    """Stop the run's monitor, if it has one, writing what it sampled."""
    monitor = _MONITORS.pop(run_id, None)
    if monitor is not None:
        monitor.finish()
