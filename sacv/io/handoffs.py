"""Typed hand-offs between the stages: plans (what a stage will do) and summaries (what it did).

Plans are returned by the planning functions of ``sacv.extract.extraction``, ``sacv.fit.fit_plan`` and
``sacv.score.scoring`` and fanned out by the flows; summaries are built by the flows, recorded under
``timings`` in ``run.json`` and printed by the command line. All are small and frozen, so Prefect
can pass them between tasks and flows as references.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExtractPlan:
    shards: dict[str, int]  # group (guidance | dataset) -> number of shards
    todo: list[tuple[str, int]]  # (group, shard) without a matching done-marker
    images: int  # distinct readable images (status ok)
    rejects: int  # rows of rejects.parquet
    model: dict  # spec, weight_hash, preprocessing: the model identity for run.json
    added: int = 0  # distinct images new to the store in this scan
    removed: int = 0  # images marked removed by this scan


@dataclass(frozen=True)
class FitPlan:
    total: int  # planned vectors (concept and null) over all layers
    todo: list[str]  # keys of the jobs without a cached result
    blocks: list[tuple[str, list[str]]]  # (layer, keys): the todo jobs cut into blocks, one fit task each


@dataclass(frozen=True)
class ScorePlan:
    shards: list[int]  # every dataset shard
    todo: list[int]  # shards whose scores are missing or were written for other content


@dataclass(frozen=True)
class ExtractSummary:
    status: str  # done | done with rejects
    images: int  # distinct readable images
    rejects: int  # rows of rejects.parquet
    shards: dict[str, int]  # group -> number of shards
    shards_run: int  # shards extracted by this run (the rest were done)
    seconds: float = 0.0  # wall time of the stage
    images_extracted: int = 0  # images decoded and run through the model by this run
    added: int = 0  # images new to the store (ExtractPlan.added)
    removed: int = 0  # images marked removed (ExtractPlan.removed)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: scan, plan, shards, record


@dataclass(frozen=True)
class FitSummary:
    status: str  # done
    vectors: int  # planned vectors
    fitted: int  # fitted by this run (the rest were cached)
    near_chance_fitted: int  # concept vectors fitted by this run below fit.near_chance
    table: str  # URI of vectors.parquet
    seconds: float = 0.0


@dataclass(frozen=True)
class ScoreSummary:
    status: str  # done
    shards_scored: int  # dataset shards scored by this run (the rest were cached)
    image_scores: str  # glob of the image_scores dataset's files
    per_set: str  # URI of per_set.parquet
    top_images: str  # URI of top_images.parquet
    contributions: str  # URI of contributions.parquet
    rows: int  # rows of the contributions table
    significant: int  # of which significant
    seconds: float = 0.0


@dataclass(frozen=True)
class RunSummary:
    extract: ExtractSummary
    fit: FitSummary | None  # None without a `concepts` section
    score: ScoreSummary | None  # None without `concepts` and `dataset`
    audit_id: str | None = None  # the audit this run recorded (tables/audits.parquet)
