"""Screenshots of a 64-run sweep in the MLflow UI, from a real browser, for the README's "Reading a sweep".

Runs the shipped `lr` sweep (64 trials, one population) in a temporary folder, starts `mlflow ui` on its
store, and drives a headless Chromium with Playwright through the views the README recommends:
  sweep_runs_table.png     the runs table filtered to the parent's children (flat), sorted by the objective
  sweep_parent_report.png  the parent run's objective_vs_params.png (its report/ artifacts)
  sweep_parent_curves.png  the parent run's loss_curves.png
Not part of the tests. Needs Debian's chromium and Playwright (in any venv; it only drives the browser):
    sudo apt install chromium && python -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python docs/screenshots.py [--gdlab .venv/bin] [--out docs/screenshots] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(bin_dir: Path, workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GDLAB_OPTUNA_STORAGE")}
    subprocess.run([str(bin_dir / "gdlab-sweep"), "lr", "--progress", "0"], cwd=workdir, env=env, check=True)


def sweep_ids(database: Path) -> tuple[str, str]:
    """(experiment id, parent run id) of the sweep in the store."""
    with sqlite3.connect(database) as connection:
        (experiment,) = connection.execute(
            "SELECT experiment_id FROM experiments WHERE name = 'sweep-lr'"
        ).fetchone()
        (parent,) = connection.execute(
            "SELECT r.run_uuid FROM runs r WHERE r.experiment_id = ? AND NOT EXISTS (SELECT 1 FROM tags t "
            "WHERE t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId')",
            (experiment,),
        ).fetchone()
    return str(experiment), parent


def start_ui(bin_dir: Path, database: Path, artifacts: Path, port: int) -> subprocess.Popen:
    command = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{database}",
               "--default-artifact-root", artifacts.as_uri(),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    ui = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return ui
        except OSError:
            time.sleep(0.5)
    ui.kill()
    raise SystemExit("mlflow ui did not start")


def shoot(base: str, experiment: str, parent: str, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        search = urllib.parse.quote(f"tags.mlflow.parentRunId = '{parent}'")  # the sweep's 64 trials
        order = urllib.parse.quote("metrics.`final/val/loss`")
        query = f"searchFilter={search}&orderByKey={order}&orderByAsc=true"
        page.goto(f"{base}/#/experiments/{experiment}/runs?{query}")
        try:  # the trials, flat: no parent to expand
            page.get_by_text(re.compile(r"^[1-9][0-9]* matching runs")).wait_for(timeout=60_000)
        except Exception:  # noqa: BLE001 (the screenshot shows what the UI shows)
            print("the runs table showed no runs within 60 s")
        close_assistant(page)
        page.wait_for_timeout(2000)
        shots.append(out / "sweep_runs_table.png")
        page.screenshot(path=str(shots[-1]))
        page.goto(f"{base}/#/experiments/{experiment}/runs/{parent}/artifacts/report/objective_vs_params.png")
        page.wait_for_timeout(5000)
        close_assistant(page)
        for name, figure in (("sweep_parent_report.png", "objective_vs_params.png"),
                             ("sweep_parent_curves.png", "loss_curves.png")):  # fmt: skip
            page.get_by_text(figure, exact=True).first.click()
            page.wait_for_timeout(3000)
            shots.append(out / name)
            page.screenshot(path=str(shots[-1]))
        browser.close()
    return shots


def close_assistant(page) -> None:
    """MLflow 3's assistant panel takes a third of the page; close it where it is open."""
    try:
        page.locator("button[aria-label='Close']").first.click(timeout=3000)
    except Exception:  # noqa: BLE001 (another MLflow version: nothing to close)
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gdlab", type=Path, default=ROOT / ".venv" / "bin", help="gdlab's venv bin folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--keep", type=Path, help="run the sweep in this folder and keep it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    context = tempfile.TemporaryDirectory(prefix="gdlab-screenshots-") if args.keep is None else None
    workdir = Path(context.name) if context else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    run_sweep(args.gdlab.resolve(), workdir)
    database = workdir / "mlruns" / "mlflow.db"
    experiment, parent = sweep_ids(database)
    port = free_port()
    ui = start_ui(args.gdlab.resolve(), database, workdir / "mlruns" / "artifacts", port)
    try:
        for path in shoot(f"http://127.0.0.1:{port}", experiment, parent, args.out):
            print(path)
    finally:
        ui.kill()
        if context:
            context.cleanup()


if __name__ == "__main__":
    main()
