"""The settings base and loader every CLI uses, and the process settings both sides share.

How to reach the broker (URL, fleet, credentials) is the wire's: broker.settings.ConnectionSettings.

Settings are built once, in a CLI, from (highest first) command-line options, the environment
(prefix EDGETUNE_) and an optional JSON/TOML/YAML file, then passed down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the field and its variable."""


class ProcessSettings(BaseModel):
    """What every long-running process of either side takes: logging, threads, /metrics."""

    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; unset: off")
    metrics_addr: str = "0.0.0.0"
    metrics_linger_s: float = Field(30, ge=0, description="keep /metrics up this long after the run ends, "
                                    "so that Prometheus scrapes the last round (SIGTERM ends it early)")
    log_level: str = "INFO"
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default)")


class EdgeTuneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGETUNE_", extra="forbid", validate_default=True)


S = TypeVar("S", bound=EdgeTuneSettings)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SettingsError(f"settings file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise SettingsError(f"settings file {path}: use .json, .toml or .yaml")
    except SettingsError:
        raise
    except Exception as e:
        raise SettingsError(f"settings file {path} is not valid {path.suffix[1:]}: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of setting names to values")
    return data


def load_settings(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
    """Command-line overrides (None = not given) > environment > file > defaults."""
    file_values = _read_file(Path(config_file)) if config_file else {}

    class _WithFile(cls):  # type: ignore[misc, valid-type]
        @classmethod
        def settings_customise_sources(cls_, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            from pydantic_settings import InitSettingsSource

            return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values))

    _WithFile.__name__ = cls.__name__
    try:
        return _WithFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            where = f"{field} (EDGETUNE_{field.upper()})" if field else "settings"
            lines.append(f"  {where}: {err['msg']}")
        raise SettingsError(f"invalid {cls.__name__}:\n" + "\n".join(lines)) from None
    except PydanticSettingsError as e:  # e.g. a JSON setting in the environment that is not JSON
        raise SettingsError(f"invalid {cls.__name__}: {e} (give JSON, e.g. EDGETUNE_STRATEGY_OPTIONS='{{\"bound\": 0.5}}')") from None


def dump_settings(settings: BaseSettings, path: Path) -> None:
    """Write the effective settings (secrets masked) beside a run's metrics."""
    data = settings.model_dump(mode="json")
    for k, v in list(data.items()):
        if "password" in k and v:
            data[k] = "**********"
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


DEMO_LABELS = ("negative", "positive")  # the VADER sentiment demo's


class LabelSettings(BaseModel):
    """The class names, in index order: one setting for the aggregator (its task), the agent and
    the device commands (EDGETUNE_LABELS: comma-separated names or a JSON list)."""

    labels: Annotated[tuple[str, ...], NoDecode] = Field(
        DEMO_LABELS, min_length=2,
        description="class names, in index order: comma-separated (EDGETUNE_LABELS=negative,positive) or a JSON list")

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, v):
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"labels {text!r} is not a JSON list ({e.msg}); or give names separated by commas")
            return [x.strip() for x in text.split(",") if x.strip()]
        return v

    @model_validator(mode="after")
    def _labels_differ(self):
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels {list(self.labels)} repeat a name")
        return self
