"""The study's one config: a YAML file checked once at load into frozen dataclasses.

Keys are spelled with hyphens in YAML and in overrides (`privacy.target-epsilon`), as
Flower's run config spells them; the dataclass fields carry the same names with
underscores. Every value is checked here, so the rest of the code can trust the object.
A file either lists every key or starts with `base: <preset or path>` and lists only what
it changes; the shipped `default` preset is the one place defaults are written down.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedsynth.common.errors import FedsynthError

PRESET_DIR = Path(__file__).parent / "presets"

Check = Callable[[Any], str | None]


class ConfigError(FedsynthError):
    """A config value, key or file that cannot be used; the message names which."""


def _checked(*checks: Check) -> Any:
    """A required dataclass field whose value must pass `checks` (each returns an error)."""
    return field(metadata={"checks": checks})


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A range check; open ends exclude the bound."""
    left, right = ("(" if low_open else "["), (")" if high_open else "]")

    def check(value: Any) -> str | None:
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        return None if ok_low and ok_high else f"must be in {left}{low}, {high}{right}"

    return check


def each(check: Check) -> Check:
    """Apply `check` to every item of a list or tuple."""

    def check_all(values: Iterable[Any]) -> str | None:
        for value in values:
            if (error := check(value)) is not None:
                return f"every item {error}"
        return None

    return check_all


def non_empty(value: Any) -> str | None:
    return None if len(value) > 0 else "must not be empty"


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def identifier(value: str) -> str | None:
    return None if _NAME.match(value) else "must be lower-case letters, digits and _ (a CSV column)"


@dataclass(frozen=True)
class Attribute:
    """A clinical attribute: a manifest column, its unit and the range it may take.

    The model sees it scaled by this declared range, never by statistics of private data.
    """

    name: str = _checked(identifier)
    unit: str = _checked()
    min: float = _checked()
    max: float = _checked()
    discrete: bool = _checked()

    def validate(self) -> list[tuple[str, str]]:
        if self.max <= self.min:
            return [("max", f"must be greater than min ({self.min})")]
        return []


@dataclass(frozen=True)
class DataConfig:
    """What a volume looks like to the model, and which attributes condition it."""

    shape: tuple[int, int, int] = _checked(each(between(4, 1024)))
    spacing: tuple[float, float, float] = _checked(each(positive))
    intensity_percentiles: tuple[float, float] = _checked(each(between(0, 100)))
    max_voxels: int = _checked(positive)  # a site's volume with more is refused unread
    attributes: tuple[Attribute, ...] = _checked(non_empty)

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        low, high = self.intensity_percentiles
        if low >= high:
            errors.append(("intensity-percentiles", "lower must be below upper"))
        names = [a.name for a in self.attributes]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            errors.append(("attributes", f"duplicate names {duplicated}"))
        return errors

    def attribute(self, name: str) -> Attribute:
        return next(a for a in self.attributes if a.name == name)


@dataclass(frozen=True)
class AutoencoderConfig:
    """MONAI AutoencoderKL, trained on public data only and then frozen."""

    channels: tuple[int, ...] = _checked(non_empty, each(positive))
    attention_levels: tuple[bool, ...] = _checked()
    latent_channels: int = _checked(positive)
    num_res_blocks: int = _checked(positive)
    norm_num_groups: int = _checked(positive)
    kl_weight: float = _checked(non_negative)
    learning_rate: float = _checked(positive)
    batch_size: int = _checked(positive)
    steps: int = _checked(non_negative)

    def validate(self) -> list[tuple[str, str]]:
        errors = _levels_match(self.channels, self.attention_levels)
        if any(c % self.norm_num_groups for c in self.channels):
            errors.append(("norm-num-groups", "must divide every entry of channels"))
        return errors


@dataclass(frozen=True)
class UnetConfig:
    """MONAI DiffusionModelUNet on latents, conditioned by one token per attribute."""

    channels: tuple[int, ...] = _checked(non_empty, each(positive))
    attention_levels: tuple[bool, ...] = _checked()
    num_res_blocks: int = _checked(positive)
    num_head_channels: int = _checked(positive)
    norm_num_groups: int = _checked(positive)
    token_dim: int = _checked(positive)

    def validate(self) -> list[tuple[str, str]]:
        errors = _levels_match(self.channels, self.attention_levels)
        if errors:
            return errors
        if any(c % self.norm_num_groups for c in self.channels):
            errors.append(("norm-num-groups", "must divide every entry of channels"))
        if any(
            c % self.num_head_channels
            for c, a in zip(self.channels, self.attention_levels, strict=True)
            if a
        ):
            errors.append(("num-head-channels", "must divide channels at attention levels"))
        return errors


@dataclass(frozen=True)
class DiffusionConfig:
    """The DDPM noise schedule and classifier-free guidance dropout used in training."""

    train_timesteps: int = _checked(between(10, 10000))
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = _checked()
    beta_start: float = _checked(between(0, 1, low_open=True, high_open=True))
    beta_end: float = _checked(between(0, 1, low_open=True, high_open=True))
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = _checked()
    condition_dropout: float = _checked(between(0, 1, high_open=True))

    def validate(self) -> list[tuple[str, str]]:
        if self.beta_end <= self.beta_start:
            return [("beta-end", f"must be greater than beta-start ({self.beta_start})")]
        return []


@dataclass(frozen=True)
class TrainingConfig:
    """The optimiser settings every site uses; the server sends this section to clients."""

    pretrain_steps: int = _checked(non_negative)
    pretrain_batch_size: int = _checked(positive)
    pretrain_learning_rate: float = _checked(positive)
    pretrain_warmup_steps: int = _checked(non_negative)
    pretrain_schedule: Literal["constant", "cosine"] = _checked()
    pretrain_ema_decay: float = _checked(between(0, 1, high_open=True))
    finetune_learning_rate: float = _checked(positive)
    finetune_optimizer: Literal["adamw", "sgd"] = _checked()
    finetune_optimizer_state: Literal["keep", "fresh"] = _checked()
    segmenter_steps: int = _checked(non_negative)
    feature_steps: int = _checked(non_negative)

    def validate(self) -> list[tuple[str, str]]:
        if self.pretrain_warmup_steps and self.pretrain_warmup_steps >= self.pretrain_steps:
            return [
                (
                    "pretrain-warmup-steps",
                    f"must be below pretrain-steps ({self.pretrain_steps})",
                )
            ]
        return []


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at each site; sampling is of subjects, the privacy unit."""

    enabled: bool = _checked()
    target_epsilon: float = _checked(positive)
    delta: float = _checked(between(0, 1, low_open=True, high_open=True))
    accountant: Literal["rdp", "prv"] = _checked()
    max_grad_norm: float = _checked(positive)
    batch_size: int | None = _checked(positive)
    sample_rate: float | None = _checked(between(0, 1, low_open=True))
    local_steps: int = _checked(positive)
    loss_draws: int = _checked(positive)
    max_physical_batch_size: int = _checked(positive)
    trainable: Literal["all", "attention", "norms", "norms+attention"] = _checked()
    grad_sample_mode: Literal["functorch", "hooks", "ghost"] = _checked()

    def validate(self) -> list[tuple[str, str]]:
        if (self.batch_size is None) == (self.sample_rate is None):
            return [("batch-size", "set exactly one of batch-size and sample-rate (other null)")]
        return []


ADAM_MAX_RATE = 0.1  # FedAdam's rate is a step per weight, not FedAvg's multiple of the delta


@dataclass(frozen=True)
class FederationConfig:
    """The rounds of the study and how sites meet."""

    rounds: int = _checked(positive)
    sites: int = _checked(positive)
    sites_per_round: int = _checked(positive)
    min_sites: int = _checked(positive)
    secure_aggregation: bool = _checked()
    server_learning_rate: float = _checked(positive)
    server_optimizer: Literal["sgd", "adam"] = _checked()

    def validate(self) -> list[tuple[str, str]]:
        if self.sites_per_round > self.sites:
            return [("sites-per-round", f"must be <= sites ({self.sites})")]
        if self.min_sites > self.sites_per_round:
            return [("min-sites", f"must be <= sites-per-round ({self.sites_per_round})")]
        if self.secure_aggregation and self.min_sites < 2:
            return [
                (
                    "min-sites",
                    "must be at least 2 with secure aggregation (the unmasked "
                    "sum of one site is that site's update)",
                )
            ]
        if self.server_optimizer == "adam" and self.server_learning_rate >= ADAM_MAX_RATE:
            return [
                (
                    "server-learning-rate",
                    f"must be below {ADAM_MAX_RATE} with "
                    "server-optimizer adam (it moves every weight by about the rate each "
                    "round; e.g. 0.01)",
                )
            ]
        return []


@dataclass(frozen=True)
class SamplingConfig:
    """How synthetic volumes are drawn from the trained model."""

    scheduler: Literal["ddim", "ddpm"] = _checked()
    steps: int = _checked(positive)
    guidance_scale: float = _checked(non_negative)
    batch_size: int = _checked(positive)


@dataclass(frozen=True)
class PathsConfig:
    """Where generated data, checkpoints and runs go; empty means the user cache dir."""

    cache_dir: str = _checked()
    run_dir: str = _checked()


@dataclass(frozen=True)
class Config:
    """The whole study."""

    seed: int = _checked(non_negative)
    device: Literal["auto", "cpu", "cuda"] = _checked()
    data: DataConfig = _checked()
    autoencoder: AutoencoderConfig = _checked()
    unet: UnetConfig = _checked()
    diffusion: DiffusionConfig = _checked()
    training: TrainingConfig = _checked()
    privacy: PrivacyConfig = _checked()
    federation: FederationConfig = _checked()
    sampling: SamplingConfig = _checked()
    paths: PathsConfig = _checked()

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        levels = len(self.autoencoder.channels) - 1
        if any(s % 2**levels for s in self.data.shape[:2]):
            errors.append(
                (
                    "data.shape",
                    f"in-plane size must be divisible by {2**levels}, the autoencoder's "
                    f"compression ({levels} halvings: autoencoder.channels has {levels + 1} "
                    "levels); any slice count runs",
                )
            )
        if self.sampling.steps > self.diffusion.train_timesteps:
            errors.append(("sampling.steps", "must be <= diffusion.train-timesteps"))
        return errors


def _levels_match(channels: tuple[int, ...], levels: tuple[bool, ...]) -> list[tuple[str, str]]:
    if len(levels) != len(channels):
        return [("attention-levels", f"must have one entry per channels level ({len(channels)})")]
    return []


def yaml_key(name: str) -> str:
    return name.replace("_", "-")


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, value: Any, reason: str) -> typing.NoReturn:
    raise ConfigError(f"config key {path} = {_describe(value)}: {reason}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Turn a YAML value into `tp`, or fail naming the key, the value and what is allowed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _convert(value, tp, path)
    if value is None:
        _fail(path, value, "must not be null")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        if value not in args:
            _fail(path, value, f"must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(path, value, "must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(path, value, f"must be a list of {len(args)} values")
        return tuple(
            _convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(path, value, "must be a number")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            _fail(path, value, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types, ranges and cross-fields."""
    prefix = f"{path}." if path else ""
    if not isinstance(raw, Mapping):
        _fail(path or "(top level)", raw, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(fields)}"
        raise ConfigError(f"config key {prefix}{key}: unknown key ({hint})")
    values = {}
    for key, f in fields.items():
        if key not in raw:
            raise ConfigError(
                f"config key {prefix}{key}: missing (list every key, or start the file with "
                "'base: default' to inherit the rest)"
            )
        value = _convert(raw[key], hints[f.name], prefix + key)
        for check in f.metadata.get("checks", ()):
            if value is not None and (error := check(value)) is not None:
                _fail(prefix + key, raw[key], error)
        values[f.name] = value
    obj = cls(**values)
    for key, reason in obj.validate() if hasattr(obj, "validate") else []:
        full = key if "." in key else prefix + key
        _fail(full, _lookup(raw, key), reason)
    return obj


def _lookup(raw: Mapping, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections")
    return raw


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_source(source: str | Path) -> Path:
    """A preset name or a YAML path -> the file to read."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {source}: a folder, not a YAML file")
    if str(source) in presets():
        return PRESET_DIR / f"{source}.yaml"
    raise ConfigError(
        f"config {source}: no such file, and no preset of that name "
        f"(presets: {', '.join(presets())})"
    )


def _deep_merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_raw(source: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a config file, with its `base:` chain merged under it."""
    path = resolve_source(source).resolve()
    if path in _seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        _fail("base", base, "must be a preset name or a path")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute() and (path.parent / base_path).is_file():
        base = str(path.parent / base_path)
    return _deep_merge(read_raw(base, (*_seen, path)), raw)


def _field_type(dotted: str) -> Any:
    """The declared type at a dotted key, or a ConfigError for a key that does not exist."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key {dotted}: cannot override inside {'.'.join(parts[:i])}")
        hints = typing.get_type_hints(cls)
        names = {yaml_key(f.name): f.name for f in dataclasses.fields(cls)}
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key {dotted}: unknown key{hint}")
        cls = hints[names[part]]
    return cls


def apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """Set dotted keys (`privacy.target-epsilon`) on a raw config mapping.

    Values may be typed (as Flower's run config gives them) or strings (from a command
    line); a string for a non-string key is read as YAML, so `[32, 32, 8]` or `null` work,
    and a quoted string for a string key loses its quotes (`-c 'paths.run-dir="/x y"'`).
    """
    merged = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        tp = _field_type(dotted)
        if isinstance(value, str) and tp is str and _quoted(value):
            try:
                value = str(yaml.safe_load(value))
            except yaml.YAMLError:
                _fail(dotted, value, "is not a valid quoted string")
        elif isinstance(value, str) and tp is not str:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                _fail(dotted, value, "is not a valid value")
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                _fail(dotted, value, f"cannot set inside non-mapping {part}")
        node[leaf] = value
    return merged


def _quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """`key=value` strings from a command line -> a mapping of overrides."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. privacy.delta=1e-6")
        out[key.strip()] = value.strip()
    return out


def load_config(
    source: str | Path = "default", overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read, merge and check a config once; the result is immutable."""
    raw = read_raw(source)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


# Keys added after configs were saved (checkpoints, run dirs, released cohorts) and the
# value every such config ran with: a stored config without one loads with it, and a
# config at that value fingerprints (config_hash) as it did before the key existed.
ADDED_KEYS: dict[tuple[str, str], Any] = {
    ("federation", "server-learning-rate"): 1.0,
    ("training", "pretrain-ema-decay"): 0.0,
    ("training", "pretrain-warmup-steps"): 0,
    ("training", "pretrain-schedule"): "constant",
    ("training", "finetune-optimizer"): "adamw",
    ("training", "finetune-optimizer-state"): "fresh",
    ("federation", "server-optimizer"): "sgd",
}


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Check a raw mapping (e.g. the training config a server sent, a checkpoint's
    config.yaml) into a Config; keys in ADDED_KEYS may be missing (see there)."""
    if isinstance(raw, Mapping):
        raw = dict(raw)
        for (section, key), value in ADDED_KEYS.items():
            if isinstance(raw.get(section), Mapping) and key not in raw[section]:
                raw[section] = {**raw[section], key: value}
    return _build(Config, raw, "")


def fingerprint_dict(config: Config) -> dict:
    """`to_dict(config)` without ADDED_KEYS at their original value: what config_hash and
    the studies' cache keys hash, so those made before a key was added stay valid."""
    facts = to_dict(config)
    for (section, key), value in ADDED_KEYS.items():
        if facts[section][key] == value:
            del facts[section][key]
    return facts


def to_dict(obj: Any) -> Any:
    """A config (or section) as plain YAML/JSON data with hyphenated keys."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def config_hash(config: Config) -> str:
    """A stable fingerprint of the config, recorded with checkpoints and releases."""
    blob = json.dumps(fingerprint_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


PRETRAINING_SECTIONS = ("seed", "data", "autoencoder", "unet", "diffusion")


def pretraining_hash(config: Config) -> str:
    """A fingerprint of what public pretraining depends on (not privacy, federation, ...),
    so a study that only changes those reuses a cached public checkpoint."""
    whole = fingerprint_dict(config)
    part = {k: whole[k] for k in PRETRAINING_SECTIONS}
    training = whole["training"].items()
    part["training"] = {k: v for k, v in training if k.startswith(("pretrain", "segmenter"))}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]
