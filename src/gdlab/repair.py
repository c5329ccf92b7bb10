"""Runs left RUNNING by a dead gdlab process end KILLED the next time any gdlab command opens their store.

Every run gdlab creates carries the host and the process that made it (`process_tags`). A kill -9, an
OOM kill or a power cut leaves the run RUNNING in MLflow forever; the first `mlflow_client` a later gdlab
process opens on that store ends such runs of this host whose process is gone (`repair_dead_runs`).
A process is identified by its pid and its start time, so a recycled pid does not keep a dead run alive.
A pid means something only in its pid namespace and until the machine reboots, so the run also records
both (containers with host networking and pods share a hostname but not a pid namespace). Runs of other
hosts, other pid namespaces, other boots, or without those records are left alone: only where a run's
process was started can anyone tell whether it is still training.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST_TAG = "gdlab.host"
PID_TAG = "gdlab.pid"
PROCESS_TAG = "gdlab.process"  # "<pid>:<start time in clock ticks>" where /proc has it
PID_NAMESPACE_TAG = "gdlab.pid_namespace"  # /proc/self/ns/pid's link: "pid:[4026531836]"
BOOT_TAG = "gdlab.boot_id"  # /proc/sys/kernel/random/boot_id: a new one at every boot


def process_identity(pid: int) -> str | None:
    """pid and start time of a live process (None: no such process, or no /proc here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime


def process_tags() -> dict[str, str]:
    """What a run records of the process that trains it."""
    pid = os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    identity = process_identity(pid)
    if identity:
        tags[PROCESS_TAG] = identity
    tags.update({key: value for key, value in where_pids_mean_something().items() if value})
    return tags


def where_pids_mean_something() -> dict[str, str | None]:
    """This process's pid namespace and boot (None where the system does not say)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    return {PID_NAMESPACE_TAG: namespace, BOOT_TAG: boot}


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def made_by_dead_process(tags: dict) -> bool:
    """True for a run of this host whose process is gone; False when unsure (another host, pid namespace or
    boot, or a run that does not record them)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    here = where_pids_mean_something()
    if any(value is None or tags.get(key) != value for key, value in here.items()):
        return False
    pid = int(tags[PID_TAG])
    if pid == os.getpid():
        return False
    identity, now = tags.get(PROCESS_TAG), process_identity(pid)
    if identity and now is not None:  # the pid is visible here: is it still the same process?
        return now != identity
    return not process_alive(pid)  # a pid we cannot see (hidepid, another pid namespace) is alive


def repair_dead_runs(client) -> int:
    """End as KILLED every RUNNING run whose gdlab process on this host died; how many were ended."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return 0
    host = socket.gethostname().replace("'", "")
    running = client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=5000,
    )  # fmt: skip
    repaired = 0
    for run in running:
        if made_by_dead_process(run.data.tags):
            client.set_tag(run.info.run_id, "failure.reason", f"its process ({run.data.tags[PID_TAG]}) died")
            client.set_terminated(run.info.run_id, status="KILLED")
            repaired += 1
    return repaired


def end_runs_of_this_process(client, experiment_id: str, reason: str) -> int:
    """End as KILLED the runs this process left RUNNING in an experiment; how many were ended. An interrupted
    command's last word: a signal that came while a run was being created leaves a run no caller holds."""
    mine = process_tags()
    key = PROCESS_TAG if PROCESS_TAG in mine else PID_TAG
    host = mine[HOST_TAG].replace("'", "")
    mine_running = (f"attributes.status = 'RUNNING' and tags.`{key}` = '{mine[key]}' "
                    f"and tags.`{HOST_TAG}` = '{host}'")  # fmt: skip
    running = client.search_runs([experiment_id], filter_string=mine_running, max_results=5000)
    for run in running:
        client.set_tag(run.info.run_id, "failure.reason", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(running)


def end_runs_of_dead_trials(client, study) -> int:
    """End KILLED the runs of `study` (an Optuna study) left RUNNING by trials that are over or by a sweep
    whose process, on this host, is gone; how many."""
    states = {int(number): state for number, state in trial_states(study).items()}
    return end_runs_of_finished_trials(client, study.study_name, states)


def trial_states(study) -> dict[str, str]:
    """{trial number: its state's name}: what `end_runs_of_finished_trials` needs of an Optuna study."""
    return {str(t.number): t.state.name for t in study.get_trials(deepcopy=False)}


def end_runs_of_finished_trials(client, study_name: str, states: dict[int, str]) -> int:
    """`end_runs_of_dead_trials` for a study whose trials are in `states` ({number: state name}).

    A failed trial's run is an orphan: its worker died or was declared dead by heartbeat. A trial told
    COMPLETE or PRUNED was told by its own process, which ends the run after the tell (its metric writer
    may still hold the end): that run is repaired only if the process that made it, on this host, is gone.
    Two sweeps on one study would otherwise end each other's finished trials KILLED."""
    filter_string = f"tags.`optuna.study` = '{study_name}' and attributes.status = 'RUNNING'"
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return 0
    repaired = 0
    for run in client.search_runs(experiment_ids, filter_string=filter_string, max_results=5000):
        tags = run.data.tags
        if "optuna.trial" in tags:
            state = states.get(int(tags["optuna.trial"]), "RUNNING")
            failed = state == "FAIL"
            dead = failed or (state in ("COMPLETE", "PRUNED") and made_by_dead_process(tags))
            reason = "its worker died; the trial failed by heartbeat" if failed else "its process died"
        else:  # a sweep's parent run: dead if its process, on this host, is gone
            dead = made_by_dead_process(tags)
            reason = "its gdlab-sweep process died"
        if dead:
            client.set_tag(run.info.run_id, "failure.reason", reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            repaired += 1
    return repaired
