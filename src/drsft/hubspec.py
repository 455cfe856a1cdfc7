"""Names of ``datasets`` hub inputs: ``owner/name[:config][@revision][#split]``.

A module of its own, without heavy imports, because both the params schema (which must tell a
hub id from a local path before anything is loaded) and the loaders in drsft.data read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HUB_SPEC = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<revision>[\w./-]+?))?"
                       r"(?:#(?P<split>[\w.\[\]:%+-]+))?")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubSpec:
    """A ``datasets`` hub id: ``owner/name[:config][@revision][#split]``."""

    repo: str
    config: str | None
    revision: str | None
    split: str


def parse_hub_spec(spec: str, default_split: str = "train") -> HubSpec | None:
    """The parts of ``owner/name[:config][@revision][#split]``, or ``None`` when ``spec`` is not one.

    A name ending in ``.jsonl``/``.json``/``.parquet`` is a file, never a hub id. ``revision`` is a commit
    (a branch or tag is accepted and resolved to its commit when loaded); ``split`` defaults to
    ``default_split``.
    """
    m = _HUB_SPEC.fullmatch(spec)
    if m is None or m["repo"].endswith(_FILE_SUFFIXES) or (m["config"] or "").endswith(_FILE_SUFFIXES):
        return None
    return HubSpec(m["repo"], m["config"], m["revision"], m["split"] or default_split)
