"""Strict configuration: ``config.toml`` loaded with tomllib into validated models.

Unknown keys, wrong types, missing paths and impossible combinations are each reported as one line that
names the dotted key, the value found and what is allowed, so a technician can fix the file without
reading code. ``appliance check-config PATH`` prints these lines.
"""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.taxonomy import Taxonomy, taxonomy_problems

IMAGE_PATTERNS = ["*.jpg", "*.jpeg", "*.png", "*.bmp", "*.tif", "*.tiff", "*.webp"]
PROVIDERS = ("tensorrt", "cuda", "cpu")


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateConfig(Section):
    dir: Path


class FolderSource(Section):
    path: Path
    patterns: list[str] = Field(default_factory=lambda: list(IMAGE_PATTERNS), min_length=1)
    recursive: bool = False
    line: str = "line1"
    camera: str = "cam1"
    polling: bool = False
    polling_interval_s: float = Field(default=2.0, gt=0)
    rescan_interval_s: float = Field(default=30.0, gt=0)
    settle_s: float = Field(default=1.0, ge=0, description="age before a rescan trusts a file")


class MqttSource(Section):
    topics: list[str] = Field(default_factory=list)
    line: str = "line1"
    camera: str = "cam1"
    max_payload_bytes: int = Field(default=32 * 1024 * 1024, gt=0)


class Sources(Section):
    folder: list[FolderSource] = Field(default_factory=list)
    mqtt: MqttSource | None = None


class OutboxConfig(Section):
    dir: Path
    heatmaps: bool = True


class TlsConfig(Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False


class MqttConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = "appliance"
    client_id: str = "appliance"
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    qos: Literal[1, 2] = 1
    keepalive_s: int = Field(default=30, ge=5)
    publish_rate_per_s: float = Field(default=50.0, gt=0, description="drain bound after reconnect")
    max_inflight: int = Field(default=20, ge=1)
    stats_interval_s: float = Field(default=60.0, gt=0)


class TaxonomyConfig(Section):
    labels: list[str] = Field(min_length=1)
    attributes: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: list[str]) -> list[str]:
        problems = taxonomy_problems(_RawTaxonomy(tuple(labels), {}))
        if problems:
            raise ValueError("; ".join(problems))
        return labels

    @field_validator("attributes")
    @classmethod
    def _valid_attributes(cls, attributes: dict[str, list[str]]) -> dict[str, list[str]]:
        problems = taxonomy_problems(_RawTaxonomy((), {k: tuple(v) for k, v in attributes.items()}))
        if problems:
            raise ValueError("; ".join(problems))
        return attributes

    def build(self) -> Taxonomy:
        return Taxonomy(labels=tuple(self.labels), attributes=dict(self.attributes))


class _RawTaxonomy(typing.NamedTuple):
    labels: tuple
    attributes: dict


class ModelConfig(Section):
    bundle: Path
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        default_factory=lambda: list(PROVIDERS)
    )
    narrative: Literal["defective", "always", "never"] = "defective"
    narrative_gguf: Path | None = None
    n_threads: int | None = Field(default=None, ge=1)
    n_gpu_layers: int = Field(default=0, ge=-1)


class IngestConfig(Section):
    dedupe: bool = True
    max_file_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=80_000_000, gt=0)
    batch_size: int = Field(default=4, ge=1, le=64)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class FeedbackConfig(Section):
    mqtt: bool = Field(default=True, description="take feedback on the feedback topic")
    topic: str | None = Field(default=None, description="default {mqtt.topic_prefix}/feedback")
    keep_mqtt_images_days: float = Field(
        default=2.0, ge=0, description="keep MQTT images this long for review (0: not at all)"
    )

    @field_validator("topic")
    @classmethod
    def _plain_topic(cls, topic: str | None) -> str | None:
        if topic is not None and (not topic or set(topic) & {"+", "#", "\0"}):
            raise ValueError("must be a non-empty topic without wildcards (+ or #)")
        return topic

    def topic_for(self, mqtt: MqttConfig) -> str:
        """Where feedback arrives; outcomes go to ``{topic}/ack``."""
        return self.topic or f"{mqtt.topic_prefix}/feedback"


class Config(Section):
    state: StateConfig
    sources: Sources = Field(default_factory=Sources)
    outbox: OutboxConfig
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    taxonomy: TaxonomyConfig
    model: ModelConfig
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    @property
    def taxonomy_obj(self) -> Taxonomy:
        return self.taxonomy.build()

    @field_validator("sources")
    @classmethod
    def _unique_folders(cls, sources: Sources) -> Sources:
        paths = [str(f.path) for f in sources.folder]
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        if duplicates:
            raise ValueError(f"folder {duplicates[0]!r} is watched twice; list each folder once")
        return sources


def cross_field_problems(config: Config, *, check_paths: bool = True) -> list[str]:
    """Checks that span sections or touch the file system, one sentence each."""
    problems: list[str] = []
    if config.sources.mqtt and config.sources.mqtt.topics and not config.mqtt.enabled:
        problems.append(
            "sources.mqtt.topics: MQTT image topics need the broker; set mqtt.enabled = true"
        )
    if not config.sources.folder and not (config.sources.mqtt and config.sources.mqtt.topics):
        problems.append(
            "sources: no image source; add a [[sources.folder]] or [sources.mqtt] topics"
        )
    tls = config.mqtt.tls
    if tls and bool(tls.cert_file) != bool(tls.key_file):
        problems.append("mqtt.tls: cert_file and key_file must be given together")
    for index, folder in enumerate(config.sources.folder):
        if _inside(config.outbox.dir, folder.path) and folder.recursive:
            problems.append(
                f"sources.folder[{index}].path: {str(folder.path)!r} contains outbox.dir "
                f"{str(config.outbox.dir)!r} and is recursive; reports would be re-ingested"
            )
    if check_paths:
        problems += _path_problems(config)
    return problems


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _path_problems(config: Config) -> list[str]:
    problems = []
    for index, folder in enumerate(config.sources.folder):
        if not folder.path.is_dir():
            problems.append(
                f"sources.folder[{index}].path: {str(folder.path)!r} is not an existing directory"
            )
    required_files = {
        "mqtt.password_file": config.mqtt.password_file,
        "model.narrative_gguf": config.model.narrative_gguf,
    }
    if config.mqtt.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            required_files[f"mqtt.tls.{name}"] = getattr(config.mqtt.tls, name)
    for key, path in required_files.items():
        if path is not None and not path.is_file():
            problems.append(f"{key}: {str(path)!r} is not an existing file")
    if not (config.model.bundle / "manifest.json").is_file():
        problems.append(
            f"model.bundle: {str(config.model.bundle)!r} holds no manifest.json; "
            "build a bundle with `appliance enroll --normal DIR --out BUNDLE`"
        )
    return problems


def _resolve(data: dict, base: Path) -> dict:
    """Make relative paths relative to the config file's directory, not the working directory."""

    def fix(value, key):
        if isinstance(value, dict):
            return {k: fix(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v, key) for v in value]
        if isinstance(value, str) and key in _PATH_KEYS and not Path(value).is_absolute():
            return str(base / value)
        return value

    return fix(data, None)


_PATH_KEYS = {
    "dir",
    "path",
    "bundle",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "narrative_gguf",
}


def parse_config(
    data: dict, *, source: str = "<config>", base: Path | None = None, check_paths: bool = True
) -> Config:
    """Validate a config mapping; raise ConfigError listing every problem."""
    if base is not None:
        data = _resolve(data, base)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from None
    problems = cross_field_problems(config, check_paths=check_paths)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path, *, check_paths: bool = True) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_config(data, source=str(path), base=path.parent.resolve(), check_paths=check_paths)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _dotted(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    value = err.get("input")
    message = err["msg"].removeprefix("Value error, ")
    return f"{key} = {value!r}: {message}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


__all__ = ["Config", "ConfigError", "load_config", "parse_config"]
