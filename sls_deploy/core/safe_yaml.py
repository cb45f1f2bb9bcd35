"""The one YAML reader (recipes, a bundle's recipe.yaml): safe, bounded, strict about duplicate keys.

``yaml.safe_load`` executes no code, but it reads a file of any size, expands an alias bomb ("billion
laughs": 9 aliases of 9 aliases ... = 9^9 items from 5 KB) into a structure whose first ``str()`` or ``repr()``
never ends, overflows the stack on deeply nested brackets (``RecursionError``), and lets a repeated key (two
``finetune:`` sections) silently replace the first. ``load_yaml`` refuses each of these with one line, in
bounded time: the file size is checked before reading, nesting depth and the number of nodes aliases expand to
are counted on the parser's events (before anything is composed or built), and keys are checked per mapping.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from sls_deploy.core.bounded import read_capped
from sls_deploy.core.errors import SlsError, short_repr

MAX_BYTES = 1 << 20  # 1 MiB: a recipe is a few KB
MAX_DEPTH = 32  # nested mappings/sequences (a recipe needs 3)
MAX_NODES = 10_000  # values, sequences and mappings as written (a recipe has about 200)
MAX_ALIAS_NODES = 10_000  # nodes that aliases (*name) stand for, summed over every use of every alias
_MERGE_TAG = "tag:yaml.org,2002:merge"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed (PyYAML's wheels have it)


class StrictLoader(_Loader):
    """``yaml.SafeLoader`` (its libyaml version when available) that refuses a repeated key in a mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base` keys may be overridden; that is what merge means
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if repeated:
                    raise ConstructorError(None, None, f"duplicate key {short_repr(key)} (the second one would "
                                           "silently replace the first)", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def check_structure(text: str) -> None:
    """Refuse (``yaml.YAMLError``) nesting deeper than MAX_DEPTH, more than MAX_NODES nodes, and aliases
    standing for more than MAX_ALIAS_NODES nodes, from the parser's event stream: nothing is composed or built
    before this passes (the composer recurses once per level, and a built alias bomb is cheap only until
    something walks it)."""
    events = _Loader(text)
    try:
        open_nodes: list[list] = []  # per open collection: [anchor, nodes so far]
        sizes: dict[str, int] = {}  # anchor -> nodes it stands for, aliases expanded
        alias_nodes = nodes = 0
        while events.check_event():
            ev = events.get_event()
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if len(open_nodes) >= MAX_DEPTH:
                    raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", ev.start_mark)
                open_nodes.append([ev.anchor, 1])
                continue
            if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, size = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = size
            elif isinstance(ev, yaml.ScalarEvent):
                size = 1
                if ev.anchor is not None:
                    sizes[ev.anchor] = 1
            elif isinstance(ev, yaml.AliasEvent):
                if any(anchor == ev.anchor for anchor, _ in open_nodes):
                    raise ComposerError(None, None, "an alias refers to a node that contains it (recursive)",
                                        ev.start_mark)
                if ev.anchor not in sizes:
                    raise ComposerError(None, None, f"found undefined alias {short_repr(ev.anchor)}", ev.start_mark)
                size = sizes[ev.anchor]
                alias_nodes += size
                if alias_nodes > MAX_ALIAS_NODES:
                    raise ComposerError(None, None, f"aliases expand to more than {MAX_ALIAS_NODES} nodes "
                                        "(an alias bomb?)", ev.start_mark)
            else:  # stream and document start/end
                continue
            nodes += 1
            if nodes > MAX_NODES:
                raise ComposerError(None, None, f"more than {MAX_NODES} values (a recipe has a few hundred)",
                                    ev.start_mark)
            if open_nodes:
                open_nodes[-1][1] += size
    finally:
        events.dispose()


def yaml_error_line(e: yaml.YAMLError) -> str:
    """One line from a PyYAML error: the problem and where (its own text spans several lines)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_yaml(path: str | os.PathLike, what: str, error: type[SlsError]) -> Any:
    """The YAML document in ``path`` (``what`` names it in messages), or one-line ``error``.

    Refused: anything but a regular file (a fifo would block), a file over MAX_BYTES, nesting deeper than
    MAX_DEPTH, more than MAX_NODES nodes (each costs time to build), aliases standing for more than
    MAX_ALIAS_NODES nodes, a repeated key in one mapping, and anything that is not UTF-8 YAML."""
    data = read_capped(path, what, error, MAX_BYTES, "a recipe is a few KB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    try:
        check_structure(text)
        loader = StrictLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {yaml_error_line(e)}") from None
