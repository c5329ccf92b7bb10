"""A job of Hydra's Optuna sweeper (`gdlab-train -m hydra/sweeper=optuna`): its MLflow run named on its
Optuna trial, as gdlab-sweep names its own (optuna-dashboard links a trial to its run).

Light on purpose (Optuna imported only when the sweeper is Optuna's): Hydra's callback runs in every job."""

from __future__ import annotations

from omegaconf import DictConfig


def note_run_on_trial(config: DictConfig, overrides: list[str], run_id: str) -> None:
    """Hydra's Optuna sweeper tells its trials itself: find this job's trial (RUNNING, with the job's
    values) and give it the user attribute mlflow_run_id, as gdlab-sweep does. Best effort."""
    sweeper = config.hydra.sweeper
    if "optuna" not in str(sweeper.get("_target_", "")) or not (
        sweeper.get("storage") and sweeper.get("study_name")
    ):
        return
    import optuna

    from gdlab.sweep.study import make_storage

    values = dict(override.split("=", 1) for override in overrides if "=" in override)
    try:
        study = optuna.load_study(study_name=sweeper.study_name, storage=make_storage(str(sweeper.storage)))
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if "mlflow_run_id" not in trial.user_attrs and same_values(trial.params, values):
                optuna.trial.Trial(study, trial._trial_id).set_user_attr("mlflow_run_id", run_id)
                return
    except Exception:  # noqa: BLE001 (the dashboard's convenience never fails the job)
        return


def same_values(params: dict, overrides: dict[str, str]) -> bool:
    """Whether a trial's typed params are what the job's `key=value` overrides say."""
    try:
        return bool(params) and all(
            key in overrides and (str(value) == overrides[key] or float(overrides[key]) == value)
            for key, value in params.items()
        )
    except (TypeError, ValueError):
        return False
