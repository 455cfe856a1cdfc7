"""Switch the pipeline to a params file: ``make use CONFIG=configs/qwen2.5-math-7b.yaml``.

1. validates the file against the typed schema (:mod:`drsft.schema`, via ``drsft.params``): every
   key of params.yaml is required and unknown keys are refused, so a missing or extra key, a wrong
   type or an out-of-range value is an error naming its key path;
2. refuses when params.yaml has uncommitted changes (they would be lost);
3. copies the file over params.yaml. ``dvc repro`` then runs the config; ``git checkout params.yaml``
   goes back to the committed (embedded) world.

Exit status 0 on success, 1 with the reason on stderr otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from drsft.params import ParamsError, load_params  # noqa: E402


def params_dirty(params: Path) -> str | None:
    """None when params.yaml equals the committed one, else the reason."""
    res = subprocess.run(["git", "status", "--porcelain", "--", params.name], cwd=params.parent,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return f"cannot ask git about {params}: {res.stderr.strip()}"
    if res.stdout.strip():
        return (f"{params} has uncommitted changes ({res.stdout.strip()}); commit them, or drop them with "
                f"`git checkout {params.name}`, before switching configs")
    return None


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(config: Path, params_path: Path) -> None:
    try:
        load_params(config)
    except ParamsError as exc:
        raise click.ClickException(f"not a valid params file:\n{exc}") from None
    reason = params_dirty(params_path.resolve())
    if reason:
        raise click.ClickException(reason)
    if config.resolve() != params_path.resolve():
        shutil.copyfile(config, params_path)
    click.echo(f"{params_path} is now {config}: `dvc repro` runs it (`git checkout {params_path}` goes back)")


if __name__ == "__main__":
    main()
