"""One-line messages from jsonargparse's (multi-line) parse errors, with a suggestion for misspelled names."""

from __future__ import annotations

import importlib
import inspect
import re

from jsonargparse import ArgumentParser

from anomalib_tiled.errors import did_you_mean


def condense_parser_error(message: str, parser: ArgumentParser | None = None) -> str:
    """Turn a (multi-line) jsonargparse error into one line, with a suggestion for unknown names.

    Args:
        message: The parser's error message.
        parser: The parser that failed, to suggest known keys.

    Returns:
        A single line.
    """
    key = _failing_key(message)
    owner = key or "config"
    for explain in (_yaml_error, _class_problem, _unknown_class):
        line = explain(message, owner)
        if line is not None:
            return line
    line = _unknown_key(message, parser)
    if line is not None:
        return line
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("Expected") and "NoneType" not in line]
    detail = specific[0] if specific else lines[-1] if lines else message
    return f"{key}: {detail}" if key else detail


def _yaml_error(message: str, owner: str) -> str | None:
    del owner
    if "Problems parsing config" not in message:
        return None
    positions = re.findall(r"line (\d+), column (\d+)", message)
    # PyYAML: unindented lines are reasons; indented ones are positions and the offending text.
    reasons = [
        raw.removeprefix("Problems parsing config:").strip()
        for raw in message.splitlines()
        if raw.strip() and not raw[:1].isspace()
    ]
    reason = reasons[-1] if reasons else "invalid YAML"
    where = f" at line {positions[-1][0]}, column {positions[-1][1]}" if positions else ""
    return f"config file: YAML syntax error{where}: {reason}; fix the YAML"


def _class_problem(message: str, owner: str) -> str | None:
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.*?)(?:\n\s*-|\Z)", message, re.DOTALL)
    if not problem:
        return None
    class_path, detail = problem.group(1), re.sub(r"\s+", " ", problem.group(2)).strip()
    option = re.search(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)", detail)
    if not option:
        return f"{owner}: {class_path}: {detail}"
    name = option.group(1).removeprefix("init_args.")
    accepted = _init_parameters(class_path)
    short = class_path.rpartition(".")[2]
    return f"{owner}.init_args.{name}: {short} has no argument '{name}'{did_you_mean(name, accepted)}"


def _unknown_class(message: str, owner: str) -> str | None:
    import_path = re.search(
        r"(?:Expected a dot import path string: |Import path )(\S+?)(?: does not correspond|\s*$)",
        message,
        re.MULTILINE,
    )
    if not import_path:
        return None
    name = import_path.group(1).strip("'\"")
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    bases = re.findall(r"<class '([^']+)'>", subtypes.group(1)) if subtypes else []
    candidates = [name for base in bases if base != "NoneType" for name in _subclass_names(base)]
    return f"{owner}: unknown class '{name}'{did_you_mean(name.rpartition('.')[2], candidates)}"


def _unknown_key(message: str, parser: ArgumentParser | None) -> str | None:
    for pattern in (
        r"Unrecognized arguments: --?(\S+)",
        r"does not accept (?:nested key|option) '([^']+)'",
        r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)",
        r"No action for key \"?'?([^\"'\s]+)",
    ):
        match = re.search(pattern, message)
        if match:
            unknown = match.group(1).lstrip("-").split("=")[0]
            known = _known_keys(parser) if parser is not None else []
            return f"{unknown}: unknown config key{did_you_mean(unknown, known)}"
    return None


def _failing_key(message: str) -> str | None:
    match = re.search(r'Parser key "([^"]+)"', message) or re.search(r"key '([^']+)'", message)
    return match.group(1) if match else None


def _known_keys(parser: ArgumentParser) -> list[str]:
    keys = []
    for action in parser._actions:  # noqa: SLF001 - jsonargparse exposes no public listing
        keys.extend(option.lstrip("-") for option in action.option_strings if option.startswith("--"))
    return keys


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]


def _subclass_names(base_path: str) -> list[str]:
    module, _, name = base_path.rpartition(".")
    try:
        base = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: set[str] = set()
    stack = [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            names.add(sub.__name__)
            stack.append(sub)
    return sorted(names)
