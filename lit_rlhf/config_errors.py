"""Argument and config-file errors that say where they are and what to write instead.

jsonargparse reports a YAML syntax error at ``"<unicode string>", line 3`` (it parses the file's text, not the
file) and an unknown key without the file it is in or the keys it could have been. :func:`explain_parser_error`
turns both into one line: ``path:line:column: message`` for YAML, and ``path:line:column: option 'a.b.c' is not
accepted; did you mean 'a.b.d'?`` (:mod:`difflib`'s closest match among the keys valid at that level) for an
unknown key. See docs/conventions.md#configuration-errors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import yaml

__all__ = [
    "config_files",
    "explain_parser_error",
    "find_key",
    "on_command_line",
    "unknown_option",
    "wrong_value",
    "yaml_syntax_error",
]

#: the parts of jsonargparse's (nested) messages that locate an unknown key
_PARTS = re.compile(
    r"""Parser key "(?P<key>[^"]+)":"""
    r"""|Problem with given class_path '(?P<cls>[^']+)':"""
    r"""|Group '(?P<group>[^']+)' does not accept option '(?P<group_option>[^']+)'"""
    r"""|Option '(?P<option>[^']+)' is not accepted"""
    r"""|does not accept option '(?P<absolute>[^']+)'"""
    r"""|[Uu]nrecognized arguments: --(?P<argument>[^\s=]+)"""
)


def config_files(args: Sequence[str]) -> list[Path]:
    """The files given with ``--config FILE`` or ``--config=FILE`` in ``args``, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.partition("=")[2]))
    return files


def yaml_syntax_error(files: Sequence[Path]) -> str | None:
    """``path:line:column: invalid YAML: problem`` of the first of ``files`` that does not parse, else ``None``."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # jsonargparse's own message says so
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            if mark is None:
                return f"{path}: invalid YAML: {problem}"
            context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            started = f" ({context} at line {context_mark.line + 1})" if context and context_mark else ""
            return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}{started}"
    return None


def unknown_option(message: str) -> tuple[list[str], str | None, str] | None:
    """Parse jsonargparse's message about an unknown key.

    Returns:
        ``(prefix, class_path, key)``: the option is ``".".join(prefix + [key])``; ``key`` is relative to the
        innermost class the message names (``class_path``; ``None`` when the key is one of the command's own),
        whose ``init_args`` ends ``prefix``. ``None`` when ``message`` is about something else.
    """
    prefix: list[str] = []
    class_path = None
    for match in _PARTS.finditer(message):
        if match["key"]:
            prefix.append(match["key"])
        elif match["cls"]:
            class_path = match["cls"]
            if not _is_dataclass(class_path):  # a dataclass's fields are written without `init_args`
                prefix.append("init_args")
        elif match["group"]:
            return prefix, class_path, f"{match['group']}.{match['group_option']}"
        elif match["option"] or match["argument"]:
            return prefix, class_path, match["option"] or match["argument"]
        elif match["absolute"]:
            return [], None, match["absolute"]
    return None


def _is_dataclass(class_path: str) -> bool:
    from dataclasses import is_dataclass

    from lit_rlhf.imports import import_callable

    try:
        return is_dataclass(import_callable(class_path))
    except ValueError:
        return False


def closest_key(key: str, valid: Sequence[str]) -> str | None:
    """The key of ``valid`` closest to ``key`` (difflib ratio ≥ 0.6), matching on the first dotted part when
    the whole key matches none (``modle.x`` → ``model.x``)."""
    valid = [v for v in valid if v != "help" and not v.endswith(".help")]
    best = difflib.get_close_matches(key, valid, n=1)
    if best:
        return best[0]
    head, dot, rest = key.partition(".")
    heads = list(dict.fromkeys(v.partition(".")[0] for v in valid))
    best = difflib.get_close_matches(head, heads, n=1)
    return best[0] + dot + rest if best and dot else (best[0] if best else None)


def class_keys(class_path: str) -> list[str]:
    """The option names (dotted, relative) that jsonargparse accepts for the class at ``class_path``."""
    from jsonargparse import ArgumentParser

    from lit_rlhf.imports import import_callable

    try:
        cls = import_callable(class_path)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls)
    except Exception:  # an explanation must never hide the original error
        return []
    return [action.dest for action in parser._actions]


def on_command_line(args: Sequence[str], option: str) -> bool:
    """Whether ``args`` give ``option`` (dotted; ``init_args`` levels optional) as ``--option[=value]``."""
    wanted = [part for part in option.split(".") if part != "init_args"]
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:].partition("=")[0]
            if [part for part in key.split(".") if part != "init_args"] == wanted:
                return True
    return False


def find_key(files: Sequence[Path], option: str, last: bool = False) -> tuple[Path, int, int] | None:
    """``(file, line, column)`` (1-based) of ``option`` (dotted; ``init_args`` levels optional) in the first of
    ``files`` that sets it (the last with ``last``: the one whose value counts), else ``None``."""
    wanted = [part for part in option.split(".") if part != "init_args"]
    for path in reversed(files) if last else files:
        try:
            root = yaml.compose(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        for chain, mark in _keys(root, []):
            if [part for part in chain if part != "init_args"] == wanted:
                return path, mark.line + 1, mark.column + 1
    return None


def find_value(files: Sequence[Path], value: str) -> tuple[Path, int, int] | None:
    """``(file, line, column)`` (1-based) of the scalar ``value`` in the last of ``files`` that holds it."""
    for path in reversed(files):
        try:
            root = yaml.compose(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        stack = [root]
        while stack:
            node = stack.pop()
            if isinstance(node, yaml.ScalarNode) and node.value == value:
                return path, node.start_mark.line + 1, node.start_mark.column + 1
            if isinstance(node, yaml.MappingNode):
                stack.extend(v for _, v in reversed(node.value))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(reversed(node.value))
    return None


def _keys(node, chain: list[str]) -> Iterator[tuple[list[str], yaml.Mark]]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = [*chain, *str(key.value).split(".")]
            yield here, key.start_mark
            yield from _keys(value, here)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _keys(item, chain)


#: lines of jsonargparse's union-type explanations that repeat what the config already says
NOISE = ("Does not validate against any of", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")


def wrong_value(message: str) -> tuple[str, str, str | None] | None:
    """Parse jsonargparse's message about a value of the wrong type or outside its choices.

    Returns:
        ``(option, reason, given)``: the dotted option (``model.init_args.micro_batch_size``), why the innermost
        key refused its value (``Expected a <class 'int'>``) and the value (``two``; ``None`` when not said).
        ``None`` when ``message`` names no key.
    """
    prefix: list[str] = []
    end = 0
    for match in _PARTS.finditer(message):
        if match["key"]:
            prefix.append(match["key"])
            end = match.end()
        elif match["cls"] and not _is_dataclass(match["cls"]):
            prefix.append("init_args")
    while prefix and prefix[-1] == "init_args":
        prefix.pop()
    if not prefix:
        return None
    block, _, given = message[end:].partition("Given value:")
    reasons = [line.strip().removeprefix("- ") for line in block.splitlines() if line.strip()]
    reasons = [r for r in reasons if not r.startswith(NOISE) and r != "Expected a <class 'NoneType'>"]
    if not reasons or len(reasons) > 3:  # a long explanation reads better on its own lines
        return None
    reason = "; ".join(reasons)
    if ". Got value: " in reason:  # a Literal's message carries the value itself
        reason, _, value = reason.partition(". Got value: ")
        return ".".join(prefix), reason, value
    return ".".join(prefix), reason, (given.splitlines()[0].strip() if given.strip() else None)


_MISSING_CLASS = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")


def unknown_class(module_name: str, name: str, args: Sequence[str], files: Sequence[Path]) -> str:
    """``no class 'module.Name'`` with the closest name the module has (``did you mean ...?``), at its place in
    the last of ``files`` that names it unless ``args`` name it on the command line."""
    import importlib

    text = f"no class '{module_name}.{name}'"
    found = None if any(f"{module_name}.{name}" in arg for arg in args) else find_value(files, f"{module_name}.{name}")
    if found is not None:
        text = f"{found[0]}:{found[1]}:{found[2]}: {text}"
    try:
        names = [n for n in dir(importlib.import_module(module_name)) if not n.startswith("_")]
    except ImportError:
        return text
    best = difflib.get_close_matches(name, names, n=1)
    return text + (f"; did you mean '{module_name}.{best[0]}'?" if best else "")


def explain_parser_error(message: str, args: Sequence[str], command_keys: Callable[[], list[str]]) -> str | None:
    """One line locating a config error and saying what to write instead, or ``None`` to keep ``message``.

    Args:
        message: jsonargparse's error message.
        args: the command-line arguments (for the ``--config`` files).
        command_keys: the options of the command (``trainer.max_epochs``, ``model``, ...), asked for only when
            the unknown key is one of them.
    """
    files = config_files(args)
    if "Problems parsing config" in message or "<unicode string>" in message:
        return yaml_syntax_error(files)
    parsed = unknown_option(message)
    missing_class = _MISSING_CLASS.search(message)
    if parsed is None and missing_class is not None:
        return unknown_class(*missing_class.groups(), args, files)
    if parsed is None:
        value = wrong_value(message)
        if value is None:
            return None
        option, reason, given = value
        # the command line overrides the files, and the last file that sets a key the earlier ones
        found = None if on_command_line(args, option) else find_key(files, option, last=True)
        where = f"{found[0]}:{found[1]}:{found[2]}: " if found else ""
        return f"{where}option '{option}': {reason}" + (f", got {given!r}" if given is not None else "")
    prefix, class_path, key = parsed
    valid = class_keys(class_path) if class_path is not None else command_keys()
    option = ".".join([*prefix, key])
    found = None if on_command_line(args, option) else find_key(files, option)
    where = f"{found[0]}:{found[1]}:{found[2]}: " if found else ""
    text = f"{where}option '{option}' is not accepted"
    suggestion = closest_key(key, valid)
    if suggestion is not None:
        text += f"; did you mean '{'.'.join([*prefix, suggestion])}'?"
    return text
