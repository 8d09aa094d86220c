"""The run configuration: one YAML file, validated by pydantic (frozen, unknown keys refused).

Every section is a small frozen model, so Prefect tasks can take it as a parameter (a reference,
not data). Defaults are documented field by field in ``docs/config.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(Section):
    spec: str = "efficientnet_lite0"  # efficientnet_lite0 | torchvision/<name> | package.module:callable
    weights: str | None = None  # state-dict file or torchvision weights name; None = the spec's default


class ConceptsConfig(Section):
    root: str  # folder (or fsspec URL) with one sub-folder per concept, e.g. DTD's images/
    names: list[str] | None = None  # concept folders to fit; None = every sub-folder
    random_pool: str | None = None  # folder of random images; None = the other concept folders
    random_sets: int = 5  # R: random sets per concept (and R null vectors)
    images_per_set: int = 30  # images drawn per random set


class DatasetConfig(Section):
    root: str | None = None  # folder with one sub-folder per class (names or indices of the model's classes)
    manifest: str | None = None  # CSV or Parquet with columns path, optional label, optional mask
    target: str = "label"  # label | predicted | a class name or index, the logit differentiated


class ExtractConfig(Section):
    dtype: Literal["float16", "float32"] = "float16"  # stored activation dtype
    shard_size: int = Field(32, ge=1)  # images per shard = per Zarr chunk along N
    batch_size: int = Field(16, ge=1)  # images per forward/backward pass
    keep_gradients: bool = True  # store dataset gradients (needed for blockwise scoring)
    max_pixels: int = Field(89_478_485, ge=1)  # decompression-bomb limit, pixels per image
    min_size: int = Field(8, ge=1)  # smaller images (either side) are rejected
    autocast: Literal["none", "bfloat16", "float16"] = "none"  # forward-pass precision (CUDA, or bfloat16 on CPU); storage dtype unchanged


class FitConfig(Section):
    solver: Literal["auto", "inmemory", "lbfgs", "sgd"] = "auto"  # auto: inmemory when it fits the budget, else lbfgs
    memory_budget_mb: int = Field(1024, ge=16)  # memory for positions per fit (inmemory subsample, auto choice)
    C: float = Field(1.0, gt=0)  # inverse L2 strength of the logistic regression
    standardize: bool = False  # penalise in z-scored space (sgd always does)
    validation_fraction: float = Field(0.25, gt=0, lt=1)  # share of images per side held out
    max_positions_per_class: int | None = Field(None, ge=1)  # subsample training positions
    max_iter: int = Field(200, ge=1)  # lbfgs iterations
    epochs: int = Field(5, ge=1)  # sgd epochs
    near_chance: float = Field(0.6, ge=0.5, le=1)  # flag vectors whose held-out balanced accuracy is below
    seed: int = 0  # random sets, validation split, subsamples, shuffles


class ExecutionConfig(Section):
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    workers: int = Field(1, ge=1)  # concurrent shard tasks in the thread pool
    loader_workers: int = Field(0, ge=0)  # DataLoader decoding processes per shard (useful on CUDA)
    dask_address: str | None = None  # run tasks on this Dask scheduler instead of the thread pool


class RunConfig(Section):
    run_dir: str  # local path or fsspec URL of the run directory
    model: ModelConfig = ModelConfig()
    layers: list[str] = Field(min_length=1)  # layer names, see `sacv layers MODEL`
    concepts: ConceptsConfig | None = None
    dataset: DatasetConfig | None = None
    extract: ExtractConfig = ExtractConfig()
    fit: FitConfig = FitConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[str]) -> list[str]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers are listed twice; give each layer once")
        return layers


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the fix."""


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}': remove it or check its spelling (see docs/config.md)"
    if error["type"] == "missing":
        return f"missing key '{key}': add it (see docs/config.md)"
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
