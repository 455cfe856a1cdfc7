"""The ``drsft`` command (``[project.scripts]``): what a user runs besides ``dvc``.

    drsft check FILE...        validate params files or config overlays (exit 1 on any problem)
    drsft use CONFIG           compose a config overlay over params.yaml (make use CONFIG=...)
    drsft ablation [...]       the paper's arms x seeds as queued experiments (make ablation)
    drsft gap-sweep [...]      the arms at several policy gaps of the embedded world (make gap-sweep)

The pipeline's stages are run by ``dvc repro`` / ``dvc exp run`` (dvc.yaml); each stage script's
``--help`` describes it (e.g. ``python stages/evaluate.py --help``).
"""

from __future__ import annotations

import click

from drsft.config import load_composed, use
from drsft.experiments import ablation_command
from drsft.gap_sweep import gap_sweep_command
from drsft.params import DEFAULT_PARAMS, ParamsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """drsft: data rewriting for off-policy SFT, as a DVC pipeline (dvc repro runs it)."""


@main.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--base", default=DEFAULT_PARAMS, show_default=True, type=click.Path(exists=True, dir_okay=False),
              help="the params an overlay is laid over")
def check_command(files, base) -> None:
    """Validate each FILE against the schema: a full params file, or a config overlay laid over
    --base (configs/*.yaml). Prints "<file>: ok" or every problem with its key path."""
    bad = 0
    for f in files:
        try:
            load_composed(f, base)
        except ParamsError as exc:
            bad += 1
            click.echo(str(exc), err=True)
        else:
            click.echo(f"{f}: ok")
    if bad:
        raise SystemExit(1)


@main.command("use")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True,
              type=click.Path(exists=True, dir_okay=False))
def use_command(config, params_path) -> None:
    """Run the pipeline on CONFIG (an overlay, e.g. configs/qwen2.5-math-7b.yaml): validate it laid
    over the embedded defaults and write the result to params.yaml (refused when params.yaml has
    uncommitted changes or is itself a composition). `git checkout params.yaml` goes back."""
    try:
        use(config, params_path)
    except ParamsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{params_path} is now {config} over the embedded defaults: `dvc repro` runs it "
               f"(`git checkout {params_path}` goes back)")


main.add_command(ablation_command)
main.add_command(gap_sweep_command)
