"""One place for configuration: a pydantic-settings `Settings` read from `FLEXQUANT_*` env vars."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEXQUANT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="SQLite DB, models, checkpoints, logs")
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Extra folders (besides data_dir) the workbench may read models from",
    )
    host: str = "127.0.0.1"
    port: int = 7860
    username: str | None = None
    password: str | None = None
    # Python of the serving environment (vLLM pins clash with llmcompressor's; see README).
    vllm_python: str | None = None
    # Convert and register the embedded SmolLM2 when the app starts (once; ~1 min on 2 cores).
    prepare_default_model: bool = True
    heartbeat_s: float = 2.0
    stale_after_s: float = 15.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "workbench.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def work_dir(self) -> Path:
        """Scratch space for running jobs; everything here is partial and may be deleted."""
        return self.data_dir / "work"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.models_dir, self.checkpoints_dir, self.work_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (what we bind by default)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
