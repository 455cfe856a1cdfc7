"""Switch the pipeline to a params file: ``make use CONFIG=configs/qwen2.5-math-7b.yaml``.

1. validates the file: ``python -m drsft.params check FILE`` (the typed schema, drsft.schema) when
   that exists, and in any case its key set against params.yaml's (every key path of nested
   mappings: a missing or an extra key is an error naming it);
2. refuses when params.yaml has uncommitted changes (they would be lost);
3. copies the file over params.yaml. ``dvc repro`` then runs the config; ``git checkout params.yaml``
   goes back to the committed (embedded) world.

Exit status 0 on success, 1 with the reason on stderr otherwise.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import click
import yaml


def key_paths(node, prefix: str = "") -> set[str]:
    """Every key path of nested mappings (``train.lr``, ``prepare.files.train.path``, ...); lists
    and scalars are leaves."""
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= key_paths(value, path)
    return paths


def key_problems(config: Path, reference: Path) -> list[str]:
    try:
        cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return [f"{config}: cannot read it as YAML: {' '.join(str(exc).split())}"]
    if not isinstance(cfg, dict):
        return [f"{config}: expected a mapping at the top level"]
    ref = yaml.safe_load(reference.read_text(encoding="utf-8"))
    have, want = key_paths(cfg), key_paths(ref)
    return ([f"{config}: {k}: missing (params.yaml has it)" for k in sorted(want - have)]
            + [f"{config}: {k}: unknown key (not in params.yaml)" for k in sorted(have - want)])


def schema_problems(config: Path) -> list[str]:
    if importlib.util.find_spec("drsft.schema") is None:
        return []  # no typed schema in this checkout: the key-set check above is the validation
    res = subprocess.run([sys.executable, "-m", "drsft.params", "check", str(config)], capture_output=True, text=True, check=False)
    return [] if res.returncode == 0 else [(res.stderr or res.stdout).strip() or f"{config}: schema check failed"]


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
    errors = key_problems(config, params_path) + schema_problems(config)
    if errors:
        raise click.ClickException("not a valid params file:\n" + "\n".join(errors))
    reason = params_dirty(params_path.resolve())
    if reason:
        raise click.ClickException(reason)
    if config.resolve() != params_path.resolve():
        shutil.copyfile(config, params_path)
    click.echo(f"{params_path} is now {config}: `dvc repro` runs it (`git checkout {params_path}` goes back)")


if __name__ == "__main__":
    main()
