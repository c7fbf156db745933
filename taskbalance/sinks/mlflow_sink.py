"""MLflow sink (needs ``mlflow`` or ``mlflow-skinny``: ``pip install taskbalance[mlflow]``)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from .base import Sink, _check_step, as_scalars

__all__ = ["MLflowSink", "mlflow_metric_name"]

_BAD = re.compile(r"[^/\w.\- ]")


def mlflow_metric_name(name: str) -> str:
    """``name`` with each character MLflow refuses in a metric key replaced by ``_`` (``a~b`` → ``a_b``).

    We keep the portable set (letters, digits, ``_ - . / space``), leaving out the colon that MLflow refuses
    on Windows, so the same run logs identically everywhere.
    """
    return _BAD.sub("_", name)


class MLflowSink(Sink):
    """Log scalars as MLflow metrics of one run, through ``MlflowClient`` (no global active-run state).

    Args:
        tracking_uri: MLflow tracking URI (``None``: MLflow's default, i.e. ``MLFLOW_TRACKING_URI``).
            MLflow ≥ 3 refuses the plain-file store (``file:...``) unless ``MLFLOW_ALLOW_FILE_STORE=true`` is
            set in the environment; a ``sqlite:///...`` URI needs the full ``mlflow`` package.
        experiment: experiment name, created if missing.
        run_name: name of the new run.
        run_id: attach to an existing run instead of creating one (e.g. when resuming); such a run is not
            terminated by :meth:`close`.
        tags: tags of a new run.

    Metric names are sanitised with :func:`mlflow_metric_name`. All scalars of one call go in one
    ``log_batch`` request.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment: str = "taskbalance",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError("MLflowSink needs mlflow: pip install 'taskbalance[mlflow]'") from error
        self._metric = Metric
        self._client: Any = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            found = self._client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                experiment_id = self._client.create_experiment(experiment)
            run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id: str = run.info.run_id
            self._owns_run = True
        else:
            self.run_id = run_id
            self._owns_run = False
        self._closed = False

    @property
    def client(self) -> Any:
        """The underlying ``MlflowClient`` (to log params or artifacts to the same run)."""
        return self._client

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._closed:
            raise ValueError(f"MLflowSink(run {self.run_id}) is closed")
        step = _check_step(step)
        now = int(time.time() * 1000)
        metrics = [self._metric(mlflow_metric_name(k), v, now, step) for k, v in as_scalars(scalars).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if not self._closed:
            if self._owns_run:
                self._client.set_terminated(self.run_id)
            self._closed = True

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"
