"""Reading ``params.yaml``: every stage reads its sections from here, never ad hoc.

:func:`load_params` validates the whole file against the typed schema (:mod:`drsft.schema`) before
a stage does any work, and raises one :class:`ParamsError` listing every problem, one per line::

    params.yaml: train.loss: must be one of 'sft', 'dft', 'is', 'is_dft' (got 'foo')
    params.yaml: train.lrr: unknown key (allowed: data, loss, ...)

Check a config file without running anything::

    python -m drsft.params check configs/qwen2.5-math-7b.yaml [more.yaml ...]

(exit status 0 when every file is valid, 1 otherwise, with the problems on stderr).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = "params.yaml"


class ParamsError(ValueError):
    """A bad value in params.yaml; the message names the key path (one line per problem)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

# YAML 1.2 floats: PyYAML follows YAML 1.1, where `3e-05` or `1e-4` (no dot) is a *string*, while DVC
# (ruamel, YAML 1.2) reads a float -- and `dvc exp run -S train.lr=3e-5` writes `3e-05`. Resolve them
# as floats so that the stages see what DVC tracks.
_FLOAT_1_2 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X)
_UniqueKeyLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def read_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Any:
    """The parsed YAML document (not validated); :class:`ParamsError` if unreadable."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run stages from the project root)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(f"{exc.context or ''} {exc.problem or ''}".split())
        raise ParamsError(f"{path}: not valid YAML: {where}{what}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


def problems(data: Any, name: str | os.PathLike = DEFAULT_PARAMS) -> list[str]:
    """Every problem of a parsed params document as ``<name>: <key.path>: <message>`` lines."""
    from drsft.schema import check

    return [f"{name}: {key}: {msg}" for key, msg in check(data)]


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    """The validated params as a plain dict (the file's own values, unchanged).

    Raises :class:`ParamsError` listing every problem (unknown key, wrong type, value out of
    range, missing key, inconsistent values), one per line, each with its key path.
    """
    data = read_params(path)
    found = problems(data, os.fspath(path))
    if found:
        raise ParamsError("\n".join(found))
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params or not isinstance(params[name], dict):
        raise ParamsError(f"params.yaml: missing section '{name}'")
    return params[name]


def pretraining_seed(prep: dict[str, Any]) -> int:
    """The seed the toy model's pretraining runs with, from the ``prepare`` section:
    ``pretrain.seed``, or ``seed`` when that is null (it redraws the model's init and batch order in
    the same world)."""
    seed = prep["pretrain"].get("seed")
    return int(prep["seed"]) if seed is None else int(seed)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m drsft.params", description="Validate params files against the schema.")
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="validate one or more params files (exit 1 on any problem)")
    chk.add_argument("files", nargs="+", metavar="FILE")
    args = ap.parse_args(argv)
    bad = 0
    for f in args.files:
        try:
            load_params(f)
        except ParamsError as exc:
            bad += 1
            print(exc, file=sys.stderr)
        else:
            print(f"{f}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
