"""Where a run's numbers go: OUTPUT_DIR/metrics.jsonl always, Weights & Biases when enabled.

Used on the main process only. wandb is imported only when the mode is not 'disabled'.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from maskcon.errors import UserError


def wandb_logged_in() -> bool:
    """True when an API key is configured (environment or ~/.netrc), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when logged in, else offline. WANDB_MODE in the environment wins over auto."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_logged_in() else "offline"


class Tracker:
    """Appends one JSON object per row to metrics.jsonl and mirrors it to W&B."""

    def __init__(self, output_dir: Path, *, config: dict, wandb_mode: str, project: str, name: str,
                 resume: bool = False, resume_step: int = 0):
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        if resume and self.metrics_path.exists():
            # rows written after the checkpoint we resume from are logged again by the resumed run
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.metrics_path.write_text("".join(row + "\n" for row in rows))
        self._file = self.metrics_path.open("a" if resume else "w")
        self.mode = resolve_wandb_mode(wandb_mode)
        self.run = None
        if self.mode != "disabled":
            import wandb

            run_id_file = self.output_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
            try:
                self.run = wandb.init(project=project, name=name, config=config, dir=str(self.output_dir),
                                      settings=wandb.Settings(quiet=True, console="off"),
                                      mode=self.mode, id=run_id, resume="allow" if run_id else None)
            except Exception as err:  # wandb raises many types for login and network trouble
                raise UserError(f"W&B could not start in {self.mode} mode ({str(err).splitlines()[0]}); "
                                "use --wandb offline or --wandb disabled") from None
            run_id_file.write_text(self.run.id)
            if self.mode == "offline":
                print(f"W&B is offline; upload later with: wandb sync {self.run.dir.rsplit('/files', 1)[0]}",
                      file=sys.stderr)

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_images(self, step: int, images: dict) -> None:
        """images: name -> PIL image. Saved next to the metrics, and to W&B as wandb.Image."""
        for name, image in images.items():
            image.save(self.output_dir / f"{name}-{step:07d}.png")
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(image) for name, image in images.items()}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def close(self) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish()
