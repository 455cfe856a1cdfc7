"""Configs as overlays: a real-scale config lists only what differs from ``params.yaml``.

``configs/<name>.yaml`` holds the keys whose values differ from the embedded defaults, plus the
paper's own values that happen to coincide with them (tagged with their source, so that a change of
a toy default cannot silently change the paper's run). :func:`compose` lays a config over the
defaults (mappings merge key by key; any other value, lists included, replaces); a key the
defaults do not have is an error naming its path, so a typo never passes as a new setting. The
result is validated against the schema like any params file.

``drsft use CONFIG`` writes the composition over ``params.yaml`` (refusing uncommitted changes,
and refusing to compose onto a file that is itself a composition), after which ``dvc repro`` and
``dvc exp run`` run the config; ``git checkout params.yaml`` goes back. ``drsft check FILE`` checks
a full params file or an overlay the same way.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from drsft.params import DEFAULT_PARAMS, ParamsError, problems, read_params

# The first line of a composed params.yaml: names the overlay it came from.
COMPOSED_MARK = "# Composed by `drsft use "


def compose(base: Mapping[str, Any], overlay: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``base`` with ``overlay`` laid over it (a new dict; neither argument is changed)."""
    out = dict(base)
    bad: list[str] = []
    for key, value in overlay.items():
        path = f"{where}{key}"
        if key not in base:
            bad.append(f"{path}: not a key of the params it overlays (a typo, or a key params.yaml lacks)")
        elif isinstance(base[key], Mapping) != isinstance(value, Mapping):
            bad.append(f"{path}: {'a mapping' if isinstance(base[key], Mapping) else 'a single value'} in the "
                       f"params it overlays, {'a mapping' if isinstance(value, Mapping) else 'a single value'} here")
        elif isinstance(value, Mapping):
            try:
                out[key] = compose(base[key], value, f"{path}.")
            except ParamsError as exc:
                bad += str(exc).splitlines()
        else:
            out[key] = value
    if bad:
        raise ParamsError("\n".join(bad))
    return out


def composed_from(path: str | os.PathLike) -> str | None:
    """The overlay a params file was composed from (its first line), or None for a hand-written one."""
    try:
        first = Path(path).read_text(encoding="utf-8").split("\n", 1)[0]
    except FileNotFoundError:
        return None
    return first[len(COMPOSED_MARK):].split("`", 1)[0] if first.startswith(COMPOSED_MARK) else None


def load_composed(config: str | os.PathLike, base: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    """``config`` laid over ``base``, validated; :class:`ParamsError` naming the file and key paths."""
    if Path(config).resolve() == Path(base).resolve():
        data = read_params(base)
    else:
        over = read_params(config)
        if not isinstance(over, Mapping):
            raise ParamsError(f"{config}: expected a mapping of params sections, got {type(over).__name__}")
        try:
            data = compose(read_params(base), over)
        except ParamsError as exc:
            raise ParamsError("\n".join(f"{config}: {line}" for line in str(exc).splitlines())) from None
    found = problems(data, os.fspath(config))
    if found:
        raise ParamsError("\n".join(found))
    return data


def _uncommitted(params: Path) -> str | None:
    res = subprocess.run(["git", "status", "--porcelain", "--", params.name], cwd=params.parent,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return f"cannot ask git about {params}: {res.stderr.strip()}"
    if res.stdout.strip():
        return (f"{params} has uncommitted changes ({res.stdout.strip()}); commit them, or drop them with "
                f"`git checkout {params.name}`, before switching configs")
    return None


def use(config: str | os.PathLike, params: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    """Compose ``config`` over ``params`` (the embedded defaults), validate, and write it to ``params``."""
    params = Path(params).resolve()
    source = composed_from(params)
    if source is not None:
        raise ParamsError(f"{params.name} is already composed from {source}; overlays apply to the embedded "
                          f"defaults: restore them first (`git checkout {params.name}` or from an earlier commit)")
    data = load_composed(config, params)
    reason = _uncommitted(params)
    if reason:
        raise ParamsError(reason)
    header = (f"{COMPOSED_MARK}{os.fspath(config)}` over the embedded defaults: every value of that config\n"
              f"# (see it for each one's source) laid over params.yaml. `git checkout params.yaml` goes back.\n")
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    tmp = params.with_name(f".{params.name}.tmp")
    tmp.write_text(header + text, encoding="utf-8")
    os.replace(tmp, params)
    return data
