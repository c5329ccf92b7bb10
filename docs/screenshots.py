"""Screenshots of a 64-run sweep in the MLflow UI, from a real browser, for the README's "Reading a sweep".

Runs the shipped `lr` sweep (64 trials, one population) in a temporary folder, starts `mlflow ui` on the
store the sweep names, and drives a headless Chromium with Playwright through the views the README recommends:
  sweep_runs_table.png     the link gdlab-sweep prints (its port swapped for the UI's), as printed: the trials
                           ranked by the objective, with its columns
  sweep_parent_report.png  the parent run's objective_vs_params.png (its report/ artifacts)
  sweep_parent_curves.png  the parent run's loss_curves.png
  sweep_refit_model.png    the refit run's page at its "Logged models" (where it lists none: the logged
                           model's own page, and a line that says so)
Not part of the tests. Needs Debian's chromium and Playwright (in any venv; it only drives the browser):
    sudo apt install chromium && python -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python docs/screenshots.py [--gdlab .venv/bin] [--out docs/screenshots] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
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


# what gdlab-sweep prints (gdlab.sweep.ui_link, gdlab.sweep): the link, the UI's command, the model
LINK_LINE = re.compile(r"in the MLflow UI: (\S+)")
STORE_LINE = re.compile(r"mlflow ui --backend-store-uri '([^']+)'")
MODEL_LINE = re.compile(r"the chosen model: models:/(\S+)")
TRAINING = "workflowType=machine_learning"  # the UI's "Model training" side bar, for the pages opened here


def run_sweep(bin_dir: Path, workdir: Path) -> str:
    """Run the sweep; its stdout (echoed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GDLAB_OPTUNA_STORAGE")}
    done = subprocess.run([str(bin_dir / "gdlab-sweep"), "lr", "--progress", "0"], cwd=workdir, env=env,
                          check=True, stdout=subprocess.PIPE, text=True)  # fmt: skip
    print(done.stdout, end="")
    return done.stdout


def printed(pattern: re.Pattern, stdout: str, what: str) -> str:
    found = pattern.search(stdout)
    if found is None:
        raise SystemExit(f"gdlab-sweep printed no {what}")
    return found.group(1)


def with_port(link: str, port: int) -> str:
    """The printed link (for `mlflow ui`'s default http://127.0.0.1:5000) on the UI started here."""
    parts = urllib.parse.urlsplit(link)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


def sweep_runs(database: Path, experiment: str) -> tuple[str, str | None]:
    """(parent run id, refit run id or None) of the sweep in the experiment."""
    with sqlite3.connect(database) as connection:
        (parent,) = connection.execute(
            "SELECT r.run_uuid FROM runs r WHERE r.experiment_id = ? AND NOT EXISTS (SELECT 1 FROM tags t "
            "WHERE t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId')",
            (experiment,),
        ).fetchone()
        refit = connection.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.experiment_id = ? "
            "AND t.key = 'gdlab.role' AND t.value = 'refit'",
            (experiment,),
        ).fetchone()
    return parent, refit and refit[0]


def start_ui(bin_dir: Path, store: str, artifacts: Path, port: int) -> subprocess.Popen:
    command = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", store,
               "--default-artifact-root", artifacts.as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    # no job runner (its consumers): nothing here needs one
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    ui = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                          start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return ui
        except OSError:
            time.sleep(0.5)
    stop_ui(ui)
    raise SystemExit("mlflow ui did not start")


def stop_ui(ui: subprocess.Popen) -> None:
    """`mlflow ui` and the server processes it started (its own session, so its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(ui.pid, sig)
        except ProcessLookupError:
            return
        try:
            ui.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)  # its workers go with it


def shoot(base: str, link: str, experiment: str, parent: str, refit: str | None, model: str | None,
          out: Path) -> list[Path]:  # fmt: skip
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(link)  # the sweep's link as printed: its trials, ranked by the objective, with its columns
        try:
            page.get_by_text(re.compile(r"^[1-9][0-9]* matching runs")).wait_for(timeout=60_000)
        except Exception:  # noqa: BLE001 (the screenshot shows what the UI shows)
            print("the runs table showed no runs within 60 s")
        close_assistant(page)
        page.wait_for_timeout(2000)
        describe_runs_table(page)
        shots.append(out / "sweep_runs_table.png")
        page.screenshot(path=str(shots[-1]))
        page.goto(f"{base}/#/experiments/{experiment}/runs/{parent}/artifacts/report/objective_vs_params.png"
                  f"?{TRAINING}")  # fmt: skip
        page.wait_for_timeout(5000)
        close_assistant(page)
        for name, figure in (("sweep_parent_report.png", "objective_vs_params.png"),
                             ("sweep_parent_curves.png", "loss_curves.png")):  # fmt: skip
            page.get_by_text(figure, exact=True).first.click()
            page.wait_for_timeout(3000)
            shots.append(out / name)
            page.screenshot(path=str(shots[-1]))
        if refit is not None and shoot_refit(page, base, experiment, refit, model):
            shots.append(out / "sweep_refit_model.png")
            page.screenshot(path=str(shots[-1]))
        browser.close()
    return shots


# each row's index and cells' text, on one line (without the run name's colour swatch, "#b45091")
ROW_CELLS = """els => els.map(e => [+e.getAttribute('row-index'), [...e.querySelectorAll('.ag-cell')].map(
    c => c.innerText.trim().replace(/^#[0-9a-f]{6}\\s+/, '').replace(/\\s+/g, ' '))])"""


def describe_runs_table(page) -> None:
    """Say what the runs table shows: its count, columns and first rows (the rows in view)."""
    count = page.get_by_text(re.compile(r"^[0-9]+ matching runs")).first
    columns = page.eval_on_selector_all(".ag-header-cell[col-id]", "es => es.map(e => e.innerText.trim())")
    rows = page.eval_on_selector_all(".ag-row[row-index]", ROW_CELLS)
    merged: dict[int, list[str]] = {}
    for index, cells in rows:  # the pinned Run Name and the other cells are separate rows in the DOM
        merged.setdefault(index, []).extend(cell for cell in cells if cell)
    print(f"runs table: {count.inner_text() if count.count() else '?'}; columns {[c for c in columns if c]}")
    for index in sorted(merged)[:3]:
        print(f"  row {index}: {merged[index]}")


def shoot_refit(page, base: str, experiment: str, refit: str, model: str | None) -> bool:
    """The refit run's page scrolled to its "Logged models"; where it lists none, the model's own page."""
    page.goto(f"{base}/#/experiments/{experiment}/runs/{refit}?{TRAINING}")
    heading = page.get_by_text(re.compile(r"^Logged models \([0-9]+\)$")).first
    try:
        heading.wait_for(timeout=30_000)
    except Exception:  # noqa: BLE001
        print("the refit run's page showed no 'Logged models' within 30 s")
        return False
    page.wait_for_timeout(2000)
    close_assistant(page)
    if heading.inner_text().strip() != "Logged models (0)":
        heading.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(1000)
        return True
    if model is None:
        print("the refit run's page lists no logged model, and gdlab-sweep printed none")
        return False
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/logged-models/{model}", timeout=10) as answer:
        home = json.load(answer)["model"]["info"]["experiment_id"]
    print(f"the refit run's page lists no logged model: its model {model} is in experiment {home}, not the "
          f"run's {experiment}; sweep_refit_model.png is the model's own page")  # fmt: skip
    page.goto(f"{base}/#/experiments/{home}/models/{model}?{TRAINING}")
    page.get_by_text("Source run", exact=True).first.wait_for(timeout=30_000)
    page.wait_for_timeout(2000)
    close_assistant(page)
    return True


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
    stdout = run_sweep(args.gdlab.resolve(), workdir)
    store = printed(STORE_LINE, stdout, "`mlflow ui --backend-store-uri` line")
    if not store.startswith("sqlite:///"):
        raise SystemExit(f"not a SQLite store: {store}")
    database = Path(store.removeprefix("sqlite:///"))
    port = free_port()
    link = with_port(printed(LINK_LINE, stdout, "MLflow UI link"), port)
    found = re.search(r"#/experiments/([^/?]+)/", link)
    if found is None:
        raise SystemExit(f"no experiment in the link: {link}")
    experiment = urllib.parse.unquote(found.group(1))
    parent, refit = sweep_runs(database, experiment)
    model = MODEL_LINE.search(stdout)
    print(f"opening {link}")
    ui = start_ui(args.gdlab.resolve(), store, database.parent / "artifacts", port)
    try:
        shots = shoot(f"http://127.0.0.1:{port}", link, experiment, parent, refit, model and model.group(1),
                      args.out)  # fmt: skip
        for path in shots:
            print(path)
    finally:
        stop_ui(ui)
        if context:
            context.cleanup()


if __name__ == "__main__":
    main()
