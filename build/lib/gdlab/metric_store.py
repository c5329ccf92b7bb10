"""Where the metric writer puts metric rows: MLflow's SQL tables in large transactions, else `log_batch`.

MLflow has one way to write many metrics, `MlflowClient.log_batch`: at most 1000 rows a call, each row
through SQLAlchemy's ORM (100–150 µs a row here, against 20–40 µs for one `executemany` into the same
table). There is no supported bulk path, so `BulkMetricStore` writes MLflow's own `metrics` and
`latest_metrics` tables with SQLAlchemy Core, on the engine and table definitions of MLflow's store, by
MLflow's rules (`SqlAlchemyStore._log_metrics`): each row validated by MLflow's `_validate_metric`; NaN
stored as 0 with is_nan, ±inf as ±max float; an exact duplicate ignored; a key's latest row replaced
only by a strictly later (step, timestamp, value); only runs whose lifecycle stage is active.

It runs only on a schema revision it was verified on (VERIFIED_REVISIONS: tests/test_metric_store.py
writes the same history through both paths and reads it back with MLflow's client). Any other store,
revision or error goes to `LogBatchSink`, which is also what a tracking server gets (several requests
in flight: each one waits on the network).
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor

# alembic revisions of MLflow's tracking schema that tests/test_metric_store.py has compared both paths
# on. A new MLflow with a new revision falls back to log_batch until the test runs on it and it is added.
VERIFIED_REVISIONS = frozenset({"dc11669786a5"})  # mlflow 3.17
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
IN_FLIGHT = 4  # concurrent log_batch requests to a tracking server
MAX_FLOAT = sys.float_info.max

Row = tuple  # (key, value, timestamp in ms, step): what gdlab.metric_writer receives, as mlflow's Metric


def stored_value(value: float) -> tuple[float, bool]:
    """(value, is_nan) as MLflow's SQL store keeps it (SqlAlchemyStore.sanitize_metric_value)."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (MAX_FLOAT if value > 0 else -MAX_FLOAT), False
    return float(value), False


def log_params(client, run_id: str, params: list[tuple[str, str]]) -> None:
    """Params through log_batch, 100 a call (MLflow's limit)."""
    from mlflow.entities import Param

    entities = [Param(key, value) for key, value in params]
    for i in range(0, len(entities), 100):
        client.log_batch(run_id, params=entities[i : i + 100])


def log_metrics(client, run_id: str, rows: list[Row]) -> None:
    """Metric rows through log_batch, MAX_BATCH a call."""
    from mlflow.entities import Metric

    metrics = [Metric(*row) for row in rows]
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])


class LogBatchSink:
    """Rows through `MlflowClient.log_batch`, 1000 a call: any store, any server."""

    def __init__(self, client, concurrent: bool = False):
        self.client = client
        self.pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="gdlab-batch") if concurrent else None

    def write(self, rows_by_run: dict[str, list[Row]]) -> dict[str, Exception]:
        """Write every run's rows; the first error of each run that had one."""

        def write_run(run_id: str, rows: list[Row]) -> Exception | None:
            try:
                log_metrics(self.client, run_id, rows)
            except Exception as error:  # an outage or a refused run: the caller reports it for this run
                return error
            return None

        if self.pool is None:
            outcomes = {run_id: write_run(run_id, rows) for run_id, rows in rows_by_run.items()}
        else:
            futures = {run_id: self.pool.submit(write_run, run_id, rows)
                       for run_id, rows in rows_by_run.items()}  # fmt: skip
            outcomes = {run_id: future.result() for run_id, future in futures.items()}
        return {run_id: error for run_id, error in outcomes.items() if error is not None}


DIALECTS = ("sqlite", "postgresql")


def verified_sql_store(client):
    """This client's MLflow SqlAlchemyStore where gdlab's bulk paths are verified on its dialect and schema
    revision; else None (a tracking server, another database, another MLflow schema)."""
    from mlflow.store.db.utils import _get_schema_version
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not isinstance(store, SqlAlchemyStore) or store.engine.dialect.name not in DIALECTS:
        return None
    try:
        revision = _get_schema_version(store.engine)
    except Exception:
        return None
    return store if revision in VERIFIED_REVISIONS else None


def read_metric_histories(client, run_ids: list[str], keys: list[str], chunk: int = 500) -> dict | None:
    """{(run id, key): [(step, timestamp, value), ...]} of the runs' metrics in a few queries of MLflow's
    `metrics` table, values as `get_metric_history` gives them (NaN where is_nan); None where this store
    has no verified bulk path."""
    store = verified_sql_store(client)
    if store is None:
        return None
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import select

    table = SqlMetric.__table__
    histories: dict[tuple[str, str], list] = {}
    with store.engine.connect() as connection:
        for start in range(0, len(run_ids), chunk):
            query = select(table.c.run_uuid, table.c.key, table.c.step, table.c.timestamp, table.c.value,
                           table.c.is_nan).where(table.c.run_uuid.in_(run_ids[start : start + chunk]),
                                                 table.c.key.in_(keys))  # fmt: skip
            for run_id, key, step, timestamp, value, is_nan in connection.execute(query):
                histories.setdefault((run_id, key), []).append(
                    (step, timestamp, math.nan if is_nan else value)
                )
    return histories


class BulkMetricStore:
    """Rows of many runs in one transaction, straight into MLflow's `metrics` and `latest_metrics`."""

    @classmethod
    def open(cls, client) -> BulkMetricStore | None:
        """The bulk path for this client's store, or None (not SQL, another dialect, another revision)."""
        store = verified_sql_store(client)
        return None if store is None else cls(store.engine)

    METRIC_COLUMNS = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")  # the table's order

    def __init__(self, engine):
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
        from sqlalchemy import tuple_

        if engine.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        self.engine = engine
        self.runs = SqlRun.__table__
        self.insert_metrics = insert(SqlMetric.__table__).on_conflict_do_nothing()
        # Positional parameters (SQLite's) go straight to the driver's executemany: SQLAlchemy's
        # per-row parameter handling would cost as much as the insert itself.
        compiled = self.insert_metrics.compile(dialect=engine.dialect, column_keys=list(self.METRIC_COLUMNS))
        positional = compiled.positional and tuple(compiled.positiontup) == self.METRIC_COLUMNS
        self.positional_sql = str(compiled) if positional else None
        latest = SqlLatestMetric.__table__
        upsert = insert(latest)
        newer = tuple_(upsert.excluded.step, upsert.excluded.timestamp, upsert.excluded.value) > tuple_(
            latest.c.step, latest.c.timestamp, latest.c.value
        )
        self.upsert_latest = upsert.on_conflict_do_update(
            index_elements=["key", "run_uuid"],
            set_={c: upsert.excluded[c] for c in ("value", "timestamp", "step", "is_nan")},
            where=newer,
        )
        self.valid_keys: set[str] = set()

    def check(self, key, value, timestamp, step) -> None:
        """MLflow's `_validate_metric`, run in full for a new key or a row not plainly valid."""
        plain = (
            type(value) in (float, int) and type(timestamp) is int and timestamp >= 0 and type(step) is int
        )
        if not plain or key not in self.valid_keys:
            from mlflow.utils.validation import _validate_metric

            _validate_metric(key, value, timestamp, step)
            self.valid_keys.add(key)

    def write(self, rows_by_run: dict[str, list[Row]]) -> None:
        """All rows in one transaction; raises (writing nothing) on any invalid row or inactive run."""
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException
        from sqlalchemy import select

        metrics, latest = [], []
        for run_id, rows in rows_by_run.items():
            newest: dict[str, tuple] = {}
            for key, value, timestamp, step in rows:
                self.check(key, value, timestamp, step)
                value, is_nan = stored_value(value)
                metrics.append((key, value, timestamp, step, is_nan, run_id))  # METRIC_COLUMNS
                if key not in newest or (step, timestamp, value) > newest[key][:3]:
                    newest[key] = (step, timestamp, value, is_nan)
            latest += [{"run_uuid": run_id, "key": key, "step": s, "timestamp": t, "value": v, "is_nan": n}
                       for key, (s, t, v, n) in newest.items()]  # fmt: skip
        if not metrics:
            return
        with self.engine.begin() as connection:
            stages = dict(connection.execute(
                select(self.runs.c.run_uuid, self.runs.c.lifecycle_stage)
                .where(self.runs.c.run_uuid.in_(list(rows_by_run)))
            ).all())  # fmt: skip
            for run_id in rows_by_run:
                if stages.get(run_id) != LifecycleStage.ACTIVE:
                    raise MlflowException(f"run {run_id} is not an active run of this store")
            if self.positional_sql:
                connection.exec_driver_sql(self.positional_sql, metrics)
            else:
                connection.execute(
                    self.insert_metrics, [dict(zip(self.METRIC_COLUMNS, row, strict=True)) for row in metrics]
                )
            connection.execute(self.upsert_latest, latest)


class MetricSink:
    """The writer's sink: the bulk path where it is verified, `log_batch` for the rest and as the fallback.

    A bulk transaction that fails (a deleted run, a locked database, an outage) is retried run by run
    through `log_batch`, so each run gets MLflow's own error and the other runs are still written.
    """

    def __init__(self, client, uri: str):
        self.bulk = BulkMetricStore.open(client)
        self.log_batch = LogBatchSink(client, concurrent=uri.startswith(("http://", "https://")))
        self.path = "log_batch" if self.bulk is None else "bulk"

    def write(self, rows_by_run: dict[str, list[Row]]) -> dict[str, Exception]:
        if self.bulk is not None:
            try:
                self.bulk.write(rows_by_run)
                return {}
            except Exception:
                pass  # log_batch below writes what it can and names each run's error
        return self.log_batch.write(rows_by_run)
