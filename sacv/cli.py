"""The ``sacv`` command line: the edge of the library, the one module of ``sacv`` that calls the
Prefect flows (``flows.*``, imported inside the commands that run them)."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from sacv.io.handoffs import ExtractSummary, FitSummary, ScoreSummary

JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable keys) instead of text.")


class _Commands(click.Group):
    """A user error (``sacv.errors.UserError``) from any command: ``error: <message>`` on stderr and
    exit status 1, no traceback; other exceptions keep theirs."""

    def invoke(self, ctx: click.Context):
        from sacv.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sacv", message="sacv %(version)s")
def main() -> None:
    """Spatial Activation Concept Vectors at dataset scale.

    Exit status: 0 done; 1 an error (``error: ...``, one line saying what to fix); 2 a wrong command line;
    3 inputs rejected with --strict; 4 policy checks failed (the tables are written)."""


def run(config):
    """Run the whole pipeline as ``sacv run`` does and return the finished run (``sacv.api.Run``).

    ``config``: a YAML path, a dict of the same keys, or a ``RunConfig``. A rerun resumes. Failing
    policy checks raise ``sacv.audit.policy.ChecksFailed`` after the tables are written; a bad config
    raises ``sacv.config.ConfigError``."""
    from sacv.api import open_run
    from sacv.config import RunConfig, load_config, parse_config

    if isinstance(config, RunConfig):
        parsed = config
    elif isinstance(config, dict):
        parsed = parse_config(config)
    elif isinstance(config, (str, Path)):
        parsed = load_config(str(config))
    else:
        raise TypeError(f"config must be a YAML path, a dict or a RunConfig, not {type(config).__name__}")
    with _flow_start_up():
        from flows.pipeline import run_stage
    run_stage("run", parsed)
    return open_run(parsed.run_dir, parsed.storage_options)


@main.command()
@click.argument("model_spec")
@click.option("--weights", default=None, help="State-dict file, or a torchvision weights name such as IMAGENET1K_V1.")
@click.option("--size", type=int, default=None, help="Input size in pixels (default: the model's own).")
@click.option("--all", "show_all", is_flag=True, help="Also list sub-modules inside blocks.")
def layers(model_spec: str, weights: str | None, size: int | None, show_all: bool) -> None:
    """List the addressable layers of MODEL_SPEC with their output shapes (C, H, W)."""
    from sacv.method.models import layer_shapes, load_model

    try:
        model = load_model(model_spec, weights)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    shapes = layer_shapes(model, size)
    top = min((name.count(".") for name in shapes), default=0)
    click.echo(f"{model.spec}: input {size or model.preprocessing.input_size}px, {len(model.class_names)} classes")
    for name, (c, h, w) in shapes.items():
        if show_all or name.count(".") <= top + 1:
            click.echo(f"  {name:<32} {c:>5} x {h:>3} x {w:>3}")


@contextmanager
def _flow_start_up() -> Iterator[None]:
    """Around the imports of a command that runs flows. First Prefect's temporary API (when no API
    URL is configured) starts in the background, to be ready when they end (flows.process). The
    imports run without garbage collections; then one collection, and what is left (the modules and
    what they built, which live until exit anyway) is frozen (``gc.freeze``): later collections and
    the teardown at exit no longer scan it (measured: each full collection over it about 0.4 s, the
    teardown at the end of ``sacv run`` about 3 s, most of it collections)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from flows.process import start_temporary_api

        start_temporary_api()
        yield
    finally:
        gc.collect()
        gc.freeze()
        if enabled:
            gc.enable()


def _run_stage(stage: str, config_path: str):
    from sacv.config import load_config

    config = load_config(config_path)
    with _flow_start_up():
        from flows.pipeline import run_stage
        from sacv.audit.policy import ChecksFailed
    try:
        return run_stage(stage, config)
    except ChecksFailed as err:
        click.echo(str(err), err=True)
        sys.exit(4)


def _report_extract(summary: ExtractSummary, strict: bool) -> None:
    click.echo(
        f"extract {summary.status}: {summary.images} images, {summary.rejects} rejected, "
        f"{summary.shards_run} shards run in {summary.seconds} s"
    )
    if summary.rejects:
        click.echo("rejected inputs are listed in tables/rejects.parquet", err=True)
        if strict:
            sys.exit(3)


def _report_fit(summary: FitSummary) -> None:
    click.echo(
        f"fit {summary.status}: {summary.vectors} vectors ({summary.fitted} fitted, "
        f"the rest cached) in {summary.seconds} s -> {summary.table}"
    )
    if summary.near_chance_fitted:
        click.echo(f"{summary.near_chance_fitted} vectors are near chance (flagged in the table)", err=True)


def _report_score(summary: ScoreSummary) -> None:
    click.echo(
        f"score {summary.status}: {summary.rows} (layer, concept, class) rows, "
        f"{summary.significant} significant, in {summary.seconds} s -> {summary.contributions}"
    )


STRICT = click.option("--strict", is_flag=True, help="Exit with status 3 when some inputs were rejected.")


@main.command("extract")
@click.argument("config_path", metavar="CONFIG")
@STRICT
def extract_command(config_path: str, strict: bool) -> None:
    """Extract activations (and dataset gradients) into RUN/store.zarr; a rerun resumes."""
    _report_extract(_run_stage("extract", config_path), strict)


@main.command("fit")
@click.argument("config_path", metavar="CONFIG")
def fit_command(config_path: str) -> None:
    """Fit concept and pseudo-concept vectors from the store; a rerun fits only what changed."""
    _report_fit(_run_stage("fit", config_path))


@main.command("score")
@click.argument("config_path", metavar="CONFIG")
def score_command(config_path: str) -> None:
    """Score every audit image and build image_scores and contributions tables."""
    _report_score(_run_stage("score", config_path))


@main.command("run")
@click.argument("config_path", metavar="CONFIG")
@STRICT
@JSON
def run_command(config_path: str, strict: bool, as_json: bool) -> None:
    """extract -> fit -> score as one Prefect flow (one audit); a rerun resumes where it stopped.
    Exits with status 4 when policy checks (config `checks`) fail."""
    summary = _run_stage("run", config_path)
    if as_json:  # keys: extract, fit, score (null when not run), audit_id
        click.echo(json.dumps(dataclasses.asdict(summary), default=str))
        if strict and summary.extract.rejects:
            sys.exit(3)
        return
    if summary.fit is not None:
        _report_fit(summary.fit)
    if summary.score is not None:
        _report_score(summary.score)
    _report_extract(summary.extract, strict)


@main.command("validate")
@click.argument("config_path", metavar="CONFIG")
def validate_command(config_path: str) -> None:
    """Check CONFIG without extracting: its keys, the model and its layers, the concept and class
    folders, the names in checks, the run directory. Exit 0, or 1 with one line per problem."""
    from sacv.extract.preflight import config_problems, run_problems

    config, problems = config_problems(config_path)
    if config is not None:
        problems = run_problems(config)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(1)
    click.echo(f"{config_path}: ok ({len(config.layers)} layers; run_dir {config.run_dir})")


@main.command("inspect")
@click.argument("run_dir")
@click.option(
    "--top", default=10, show_default=True, help="Rows of each list to show (contributions, concepts, rejects)."
)
@click.option("--layer", "layers", multiple=True, help="Only this layer (repeatable).")
@click.option("--concept", "concepts", multiple=True, help="Only this concept (repeatable).")
@click.option("--class", "classes", multiple=True, help="Only this class, by name or index (repeatable).")
@JSON
def inspect_command(
    run_dir: str, top: int, layers: tuple[str, ...], concepts: tuple[str, ...], classes: tuple[str, ...], as_json: bool
) -> None:
    """Print what a run directory holds: stages done, counts, rejects, summaries per layer and
    concept, top contributions."""
    from sacv.report.summary import describe_run, run_facts

    try:
        if as_json:
            click.echo(json.dumps(run_facts(run_dir, top, layers, concepts, classes), default=str))
        else:
            click.echo(describe_run(run_dir, top, layers, concepts, classes))
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from None


@main.command("history")
@click.argument("run_dir")
@JSON
def history_command(run_dir: str, as_json: bool) -> None:
    """Print the audits recorded in RUN_DIR (tables/audits.parquet), oldest first."""
    from sacv.audit.audits import describe_audits, done_audits
    from sacv.io.rundir import RunDir

    if as_json:  # {"run_dir": ..., "audits": [one object per audit, the columns of audits.parquet]}
        audits = done_audits(RunDir(run_dir))
        rows = json.loads(audits.to_json(orient="records", date_format="iso"))
        click.echo(json.dumps({"run_dir": run_dir, "audits": rows}))
    else:
        click.echo(describe_audits(run_dir))


@main.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--out", default="compare", show_default=True, help="Folder for compare.parquet and compare.html.")
def compare_command(run_a: str, run_b: str, out: str) -> None:
    """Change in contribution from RUN_A to RUN_B (two models, same images and concepts)."""
    from sacv.report.compare import compare_runs

    try:
        table = compare_runs(run_a, run_b, out)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"{len(table)} rows, {int(table['significant'].sum())} significant changes -> "
        f"{out}/compare.parquet, {out}/compare.html"
    )


@main.command("compact")
@click.argument("run_dir")
@click.option(
    "--wait", "wait_s", default=0.0, show_default=True, help="Seconds to wait for a run that holds RUN_DIR's lock."
)
def compact_command(run_dir: str, wait_s: float) -> None:
    """Give the images of RUN_DIR's store contiguous rows again, dropping the rows of removed images.
    The next `sacv run` rescores the rewritten shards and rebuilds the tables (docs/store.md)."""
    from sacv.extract.compaction import compact, describe

    try:
        summary = compact(run_dir, wait_s=wait_s)
    except (ValueError, RuntimeError) as err:  # RunLocked is a RuntimeError
        raise click.ClickException(f"compact failed: {err}") from None
    click.echo(describe(summary))


@main.command("report")
@click.argument("run_dir")
def report_command(run_dir: str) -> None:
    """Build RUN_DIR/report/index.html (static, self-contained)."""
    from sacv.report.build import build_report

    click.echo(f"report: {build_report(run_dir)}")


@main.command("evaluate")
@click.argument("run_dir")
def evaluate_command(run_dir: str) -> None:
    """Localisation against the dataset's masks -> RUN_DIR/tables/localisation.parquet."""
    from sacv.score.localisation import evaluate_run

    table = evaluate_run(run_dir)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@main.command()
@click.option("--out", default="demo-out", show_default=True, help="Output folder: data/, config.yaml, run/.")
@click.option("--small", is_flag=True, help="A smaller data set, for a quick check.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated images.")
def demo(out: str, small: bool, seed: int) -> None:
    """Offline demo: generated concepts and masked scenes -> the full pipeline on EfficientNet-Lite0 -> report."""
    import importlib.util

    if importlib.util.find_spec("skimage") is None:
        raise click.ClickException("sacv demo draws its images with scikit-image: pip install 'sacv[demo]'")
    with _flow_start_up():
        from flows.demo import run_demo

    summary = run_demo(out, small=small, seed=seed)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"report: {summary['report']}")


if __name__ == "__main__":
    main()
