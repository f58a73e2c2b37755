"""Experiment tracking: Weights & Biases, offline by default, imported lazily (optional on GPU boxes)."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (``logger=none``); the W&B one below has the same methods."""

    run_dir: Path | None = None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def image(self, key: str, path: Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """One W&B run per run directory; a resumed run continues the same W&B run (its id is kept on disk)."""

    def __init__(self, cfg, run_dir: Path, config: dict, name: str, mode: str):
        import wandb

        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            config=config,
            tags=list(cfg.tags),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run_dir = Path(self.run.dir).parent if self.run.dir else None
        self._step = 0

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._step = self._step + 1 if step is None else step
        self.run.log(dict(metrics), step=self._step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)}, step=self._step)

    def image(self, key: str, path: Path) -> None:
        self.run.log({key: self.wandb.Image(str(path))}, step=self._step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg, run_dir: Path, config: dict, name: str) -> Tracker:
    """``cfg`` is ``cfg.logger``. ``WANDB_MODE`` in the environment wins over ``logger.mode``."""
    if not cfg.wandb or cfg.mode == "disabled":
        return Tracker()
    try:
        import wandb  # noqa: F401
    except ImportError:
        log.warning("wandb is not installed: metrics go to metrics.json only (pip install wandb, or logger=none)")
        return Tracker()
    return WandbTracker(cfg, run_dir, config, name, mode=os.environ.get("WANDB_MODE") or cfg.mode)
