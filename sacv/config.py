"""The run configuration: one YAML file, validated by pydantic (frozen, unknown keys refused).

Every section is a small frozen model, so Prefect tasks can take it as a parameter (a reference,
not data). Defaults are documented field by field in ``docs/config.md``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sacv.errors import InputError
from sacv.io.storage import redact


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PreprocessingConfig(Section):
    """The model's input: shorter side resized, square centre crop, ``(x / 255 - mean) / std``."""

    resize: int = Field(256, ge=0)  # shorter side in pixels before the crop; 0 keeps the image's size
    crop: int = Field(224, ge=0)  # square centre crop; 0 keeps the resized image whole
    mean: list[float] = [0.485, 0.456, 0.406]  # per RGB channel, on [0, 1]
    std: list[float] = [0.229, 0.224, 0.225]  # per RGB channel, on [0, 1]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"  # of the resize

    @field_validator("mean", "std")
    @classmethod
    def _three_channels(cls, values: list[float], info) -> list[float]:
        if len(values) != 3:
            raise ValueError(f"has {len(values)} values; give one per RGB channel (3)")
        if info.field_name == "std" and min(values) <= 0:
            raise ValueError("must be positive: the inputs are divided by it")
        return values


class ModelConfig(Section):
    spec: str = "efficientnet_lite0"  # efficientnet_lite0 | torchvision/<name> | package.module:callable
    weights: str | None = None  # state-dict file or torchvision weights name; None = the spec's default
    preprocessing: PreprocessingConfig | None = None  # None = the spec's own
    class_names: list[str] | str | None = None  # names in output order, or a text file of one per line

    @field_validator("class_names")
    @classmethod
    def _names(cls, value: list[str] | str | None) -> list[str] | str | None:
        names = read_class_names(value) if isinstance(value, str) else value
        if names is not None and len(set(names)) != len(names):
            doubled = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"names appear twice: {doubled[:5]}; give each output its own name")
        return value

    def loader_options(self) -> dict:
        """What :func:`sacv.method.models.cached_model` applies over the spec's own: preprocessing
        (a dict) and class names (a tuple), each None when not set."""
        names = read_class_names(self.class_names) if isinstance(self.class_names, str) else self.class_names
        return {
            "preprocessing": None if self.preprocessing is None else self.preprocessing.model_dump(),
            "class_names": None if names is None else tuple(names),
        }


def read_class_names(path: str) -> list[str]:
    """The class names of a text file: one per line, in output order (blank lines ignored)."""
    if not Path(path).is_file():
        raise ValueError(f"class-names file {path} does not exist; give a text file with one name per line, or a list")
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-names file {path} holds no names; write one name per line, in output order")
    return names


def _check_local_folder(path: str | None) -> str | None:
    """Local paths must be existing folders (fsspec URLs are checked when they are read)."""
    if path is not None and "://" not in path and not Path(path).is_dir():
        raise ValueError(f"folder {path} does not exist; fix the path (relative paths start at the working directory)")
    return path


def _check_local_file(path: str | None) -> str | None:
    if path is not None and "://" not in path and not Path(path).is_file():
        raise ValueError(f"file {path} does not exist; fix the path")
    return path


class ConceptsConfig(Section):
    root: str  # folder (or fsspec URL) with one sub-folder per concept, e.g. DTD's images/
    names: list[str] | None = None  # concept folders to fit; None = every sub-folder
    random_pool: str | None = None  # folder of random images; None = the other concept folders
    random_sets: int = Field(5, ge=1)  # R: random sets per concept, each one vector (docs/tables.md, "Significance")
    images_per_set: int = Field(30, ge=2)  # images drawn per random set
    images_per_concept: int = Field(30, ge=2)  # n: a concept's images fitted (a seeded draw); pseudo-concepts' size
    pseudo_concepts: int = Field(40, ge=3)  # P: random image sets of n images a concept is tested against

    _folders = field_validator("root", "random_pool")(_check_local_folder)


class DatasetConfig(Section):
    root: str | None = None  # folder with one sub-folder per class (names or indices of the model's classes)
    manifest: str | None = None  # CSV or Parquet with columns path, optional label, optional mask
    target: str = "label"  # label | predicted | a class name or index, the logit differentiated

    _root = field_validator("root")(_check_local_folder)
    _manifest = field_validator("manifest")(_check_local_file)


class ExtractConfig(Section):
    dtype: Literal["float16", "float32"] = "float16"  # stored activation dtype
    shard_size: int = Field(32, ge=1)  # images per shard = per Zarr chunk along N
    shards_per_task: int = Field(8, ge=1)  # shards one extraction task pipelines (decode, compute, write overlap)
    scan_batch: int = Field(20_000, ge=1)  # files one planning task reads and hashes (the batches fan out)
    batch_size: int = Field(16, ge=1)  # images per forward/backward pass
    keep_gradients: bool = True  # store dataset gradients (needed for blockwise scoring)
    max_pixels: int = Field(89_478_485, ge=1)  # decompression-bomb limit, pixels per image
    min_size: int = Field(8, ge=1)  # smaller images (either side) are rejected
    autocast: Literal["none", "bfloat16", "float16"] = (
        "none"  # forward-pass precision (CUDA, or bfloat16 on CPU); storage dtype unchanged
    )
    decoder: Literal["pil", "torchvision"] = (
        "pil"  # torchvision: JPEGs decoded and resized on the device (nvjpeg on CUDA)
    )


class FitConfig(Section):
    solver: Literal["auto", "lbfgs", "mean_difference", "dask_ml"] = (
        "auto"  # auto = lbfgs: batched exact L-BFGS per fit block
    )
    memory_budget_mb: int = Field(
        1024, ge=16
    )  # float32 positions + per-(image, job) tables one fit block holds (else streamed)
    C: float = Field(1.0, gt=0)  # inverse L2 strength of the logistic regression
    standardize: bool = False  # penalise in z-scored space
    validation_fraction: float = Field(0.25, gt=0, lt=1)  # share of images per side held out
    max_positions_per_class: int | None = Field(
        None, ge=1
    )  # subsample training positions (per job; mean_difference uses all)
    max_iter: int = Field(200, ge=1)  # lbfgs iterations, per job
    tol: float = Field(
        1e-8, gt=0
    )  # lbfgs: stop a job when its gradient (objective / C Σs, whitened variables) is below this
    whiten: bool = False  # mean_difference: whiten by the inverse covariance of the concept's positions (both sides)
    intercept: Literal["midpoint", "logistic"] = (
        "midpoint"  # mean_difference: halfway between the means, or a 1-D logistic fit
    )
    compare_logistic: bool = True  # mean_difference: also fit the exact vector; report cosine and its accuracy
    near_chance: float = Field(0.6, ge=0.5, le=1)  # flag vectors whose held-out balanced accuracy is below
    seed: int = 0  # random sets, validation split, subsamples, shuffles


class ScoreConfig(Section):
    mode: Literal["blockwise", "streamed"] = "blockwise"  # from stored gradients, or recompute them per shard
    alpha: float = Field(0.05, gt=0, lt=1)  # significance level after correction
    correction: Literal["holm", "bh"] = "holm"  # multiple-testing correction across the contributions table
    statistic: Literal["contribution", "spatial", "tcav"] = (
        "contribution"  # what is tested against the pseudo-concepts (docs/tables.md, "Significance")
    )
    min_images: int = Field(3, ge=1)  # classes with fewer images get p_value null and a reason
    store_maps: bool = False  # also keep maps/<layer>/S_k and S_kc (N, K, H, W) float16 in the store


class AuditConfig(Section):
    baseline: str | None = None  # audit id that drift.parquet compares the latest audit with; None = the previous audit


class NoSignificantContribution(Section):
    """Concept ``concept`` must not contribute significantly to any class (``classes``: only these)."""

    kind: Literal["no_significant_contribution"]
    concept: str  # a concept folder name
    direction: Literal["positive", "negative", "any"] = "positive"  # sign of the effect size that fails the check
    classes: list[str] | None = None  # class names; None = every class
    layer: str | None = None  # one of `layers`; None = every layer


class MinSpatialScore(Section):
    """The spatial score of (layer, concept, class) must be at least ``value``."""

    kind: Literal["min_spatial_score"]
    concept: str  # a concept folder name
    class_name: str  # a class name of the model
    layer: str  # one of `layers`
    value: float = Field(ge=0, le=1)  # the smallest spatial score that passes


class MaxDrift(Section):
    """No row of drift.parquet may change by more than ``value`` (spatial or TCAV score)."""

    kind: Literal["max_drift"]
    value: float = Field(gt=0)  # the largest |change| that passes
    significant_only: bool = False  # only rows whose drift is significant can fail


Check = Annotated[NoSignificantContribution | MinSpatialScore | MaxDrift, Field(discriminator="kind")]
CHECK_KINDS = {
    "no_significant_contribution": NoSignificantContribution,
    "min_spatial_score": MinSpatialScore,
    "max_drift": MaxDrift,
}


class ExecutionConfig(Section):
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    workers: int = Field(1, ge=1)  # concurrent shard tasks in the thread pool (1: extraction runs in the flow's thread)
    loader_workers: int = Field(
        0, ge=0
    )  # image decoders per process, kept across shards (useful on CUDA); 0: in the model's thread
    loader: Literal["auto", "threads", "processes"] = (
        "auto"  # decoders; auto: processes for the PIL decoder (they leave the GIL to the model), else threads
    )
    write_workers: int = Field(4, ge=1)  # chunk-writer threads per extraction task (compression releases the GIL)
    dask_address: str | None = None  # run tasks on this Dask scheduler instead of the thread pool
    lock_wait_s: float = Field(
        0, ge=0
    )  # how long a second run on the same run_dir waits for the lock; 0 = stop at once
    lock_ttl_s: float = Field(
        120, gt=0
    )  # a lock without heartbeat this long is stale (its holder died on another host)
    allow_tf32: bool = False  # let CUDA use TF32 (gradients off by several %, docs/numerics.md); CPU unaffected
    torch_threads: int | None = Field(
        None, ge=1
    )  # torch CPU threads of every process that runs the model; None: the flow process's count (docs/deploy.md)


def require_concept_images(concept: str, count: int, wanted: int) -> None:
    """A concept needs ``concepts.images_per_concept`` images: fewer is a ValueError naming the key
    and the most it can be set to."""
    if count < wanted:
        raise ValueError(
            f"concept {concept!r} has {count} usable images, but concepts.images_per_concept is {wanted}: add "
            f"images to its folder or set concepts.images_per_concept to {max(count, 2)} or less (at least 2; "
            "the pseudo-concepts it is tested against have the same size)"
        )


class RunConfig(Section):
    run_dir: str  # local path or fsspec URL of the run directory
    model: ModelConfig = ModelConfig()
    layers: list[str] = Field(min_length=1)  # layer names, see `sacv layers MODEL`
    concepts: ConceptsConfig | None = None
    dataset: DatasetConfig | None = None
    extract: ExtractConfig = ExtractConfig()
    fit: FitConfig = FitConfig()
    score: ScoreConfig = ScoreConfig()
    audit: AuditConfig = AuditConfig()
    checks: list[Check] = []  # policy checks evaluated after each audit (docs/config.md)
    execution: ExecutionConfig = ExecutionConfig()
    storage_options: dict[
        str, dict[str, Any]
    ] = {}  # URL prefix -> fsspec options (longest prefix wins); credentials: environment

    @field_validator("storage_options")
    @classmethod
    def _url_prefixes(cls, mapping: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        local = [prefix for prefix in mapping if "://" not in prefix]
        if local:
            raise ValueError(
                f"storage_options keys are URL prefixes such as 's3://bucket/'; {local} are not "
                "(local paths need no options)"
            )
        return mapping

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[str]) -> list[str]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers are listed twice; give each layer once")
        return layers

    @model_validator(mode="after")
    def _loader_fits_decoder(self) -> RunConfig:
        if self.execution.loader == "processes" and self.extract.decoder == "torchvision":
            raise ValueError(
                "execution.loader 'processes' decodes with PIL, but extract.decoder is 'torchvision' "
                "(decoded on the device; its loaders only read files): set execution.loader: threads"
            )
        return self

    @model_validator(mode="after")
    def _check_names(self) -> RunConfig:
        """Layers and (when the config lists them) concepts named by checks must exist; class names
        are checked against the model when the run starts (``sacv.audit.policy.validate_checks``)."""
        concepts = self.concepts.names if self.concepts is not None else None
        for i, check in enumerate(self.checks):
            if getattr(check, "layer", None) is not None:
                unknown_name(f"checks[{i}].layer", check.layer, self.layers)
            if concepts is not None and getattr(check, "concept", None) is not None:
                unknown_name(f"checks[{i}].concept", check.concept, concepts)
        return self


def config_record(config: RunConfig) -> dict:
    """The config as written into run.json: JSON values, secrets in ``storage_options`` redacted."""
    record = config.model_dump(mode="json")
    record["storage_options"] = redact(record["storage_options"])
    return record


def unknown_name(key: str, name: str, known: list[str]) -> None:
    """Raise InputError naming ``key`` and the close known names when ``name`` is not in ``known``."""
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise InputError(f"{key} {name!r} is unknown: {hint}known: {sorted(known)[:20]}")


def numeric_mode(config: RunConfig) -> dict:
    """The settings that change the extracted numbers, beyond the model and the store dtype:
    ``{}`` in the default exact float32 mode with PIL decoding, else ``autocast``, ``allow_tf32``
    and/or ``decoder``. Part of the
    run record and of every cache key (shard digests, fit keys, score keys); empty by default, so
    keys of default runs are unchanged."""
    mode = {}
    if config.extract.autocast != "none":
        mode["autocast"] = config.extract.autocast
    if config.execution.allow_tf32:
        mode["allow_tf32"] = True
    if config.extract.decoder != "pil":
        mode["decoder"] = config.extract.decoder
    return mode


def numeric_warnings(config: RunConfig) -> list[str]:
    """What a non-default numeric mode costs in accuracy, said once per run (docs/numerics.md)."""
    warnings = []
    if config.extract.autocast != "none":
        warnings.append(
            f"extract.autocast is {config.extract.autocast}: gradients and S_k->c sums are far less exact "
            "than in float32 and predicted classes can change (see docs/numerics.md); "
            "set extract.autocast: none for exact numbers"
        )
    if config.execution.allow_tf32:
        warnings.append(
            "execution.allow_tf32 is on: on CUDA, gradients differ from float32 by several per cent "
            "(see docs/numerics.md); set it to false for exact numbers"
        )
    return warnings


class ConfigError(InputError):
    """A config file that cannot be used; the message names the key and the fix."""


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key ``loc`` was found."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # a list index
            continue
        if part in CHECK_KINDS:  # the tag of a check: its model
            model = CHECK_KINDS[part]
            continue
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), model)
    return list(model.model_fields)


def _describe(error: dict) -> str:
    if not error["loc"] and error["type"] == "value_error":  # a check across sections names its keys itself
        return error["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(error["loc"]), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key '{key}': {hint}remove it or fix its spelling (see docs/config.md)"
    if error["type"] == "missing":
        return f"missing key '{key}': add it (see docs/config.md)"
    if not error["loc"]:  # a check across sections: the message names the key
        return error["msg"].removeprefix("Value error, ")
    return f"'{key}': {error['msg']} (got {error.get('input')!r})"


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; every problem is listed in one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = "\n  ".join(_describe(e) for e in err.errors())
        raise ConfigError(f"{source} has {err.error_count()} problem(s):\n  {problems}") from None
