"""What every command line shares: flags generated from the settings (ccpcsa.settings), a
parser that reports a bad flag in one line, and one ladder from an exception to an exit code.

Exit codes (ccpcsa.exits): 2 when the command refuses before it starts work (a bad setting, bad
data, a checkpoint it cannot use, a run folder in use), 1 when the work fails (a ValueError or
OSError while running, training that diverges, a Ray error), 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ccpcsa import exits
from ccpcsa.checkpoint import CheckpointError
from ccpcsa.data import DataError
from ccpcsa.runlock import RunInUseError
from ccpcsa.settings import SettingError, TrainingSettings, from_dict, load_yaml, setting_names

REFUSALS = (SettingError, DataError, CheckpointError, RunInUseError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_pair(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type: LOW,HIGH (or LOW HIGH)."""

    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.replace(",", " ").split()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH numbers, got {text!r}") from None

    return parse


def _plain(hint: Any) -> Any:
    """int for `int | None`, list[int] for `list[int] | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _default_text(spec: dataclasses.Field, default: Any) -> str:
    meta = spec.metadata["setting"]
    if meta.default_text is not None:
        return f" (default: {meta.default_text})"
    if default is False or default == []:
        return ""
    if default is True:
        return " (default: on)"
    if isinstance(default, list):
        return f" (default: {','.join(map(str, default))})"
    return f" (default: {default})"


def add_settings(parser: argparse.ArgumentParser, cls: type[TrainingSettings],
                 groups: tuple[str, ...] = ()) -> None:
    """One flag per setting of `cls`, in argument groups (`groups` first, in that order). Every
    flag defaults to None, so that what a user gave can be told from the defaults."""
    hints = typing.get_type_hints(cls)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for name in groups:
        sections[name] = parser.add_argument_group(name)
    for spec in dataclasses.fields(cls):
        meta = spec.metadata.get("setting")
        if meta is None:
            continue
        default = (spec.default_factory() if spec.default is dataclasses.MISSING
                   else spec.default)
        section = sections.get(meta.group) or sections.setdefault(
            meta.group, parser.add_argument_group(meta.group))
        flags = [f"--{spec.name.replace('_', '-')}", *([meta.short] if meta.short else [])]
        kind = _plain(hints[spec.name])
        options: dict[str, Any] = {"dest": spec.name, "default": None,
                                   "help": meta.help + _default_text(spec, default)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            if item is str:
                options.update(action="append", metavar=meta.metavar)
            else:
                options.update(type=number_pair(finite_float if item is float else int),
                               metavar=meta.metavar or "LOW,HIGH")
        else:
            options["type"] = {float: finite_float}.get(kind, kind)
            if meta.metavar:
                options["metavar"] = meta.metavar
            if meta.choices:
                options["choices"] = meta.choices
        section.add_argument(*flags, **options)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help="YAML file with any of these settings (keys = flag names, dashes "
                             "or underscores); flags given beside it override it")


def settings_of(args: argparse.Namespace, cls: type[TrainingSettings]
                ) -> tuple[Any, frozenset[str]]:
    """The validated configuration (defaults < --config YAML < flags) and the names of the
    settings the user gave, by flag or in the file."""
    file_values = load_yaml(args.config, cls) if getattr(args, "config", None) else {}
    flags = {name: getattr(args, name) for name in setting_names(cls)
             if getattr(args, name, None) is not None}
    given = frozenset(file_values) | frozenset(flags)
    return from_dict(cls, {**file_values, **flags}), given


@contextmanager
def refusing() -> Iterator[None]:
    """Checks before the work starts: any ValueError there is a refusal (exit 2)."""
    try:
        yield
    except REFUSALS:
        raise
    except ValueError as exc:
        raise SettingError(exits.one_line(exc)) from None


def run_guarded(body: Callable[[Any], int], interrupted: Callable[[BaseException], str]) -> int:
    """Run `body(termination)` (see exits.terminate_as_interrupt) and turn what it raises into
    one line on stderr and an exit code; a bug that is not Ray's keeps its traceback."""
    with exits.terminate_as_interrupt() as termination:
        try:
            return body(termination)
        except KeyboardInterrupt as exc:
            print(f"error: {interrupted(exc)}", file=sys.stderr)
            return exits.interrupted_code(exc)
        except FloatingPointError as exc:
            print(f"error: training diverged ({exits.one_line(exc)}); lower --lr or "
                  "--finetune-lr", file=sys.stderr)
            return exits.FAILED
        except REFUSALS as exc:
            print(f"error: {exits.one_line(exc)}", file=sys.stderr)
            return exits.REFUSED
        except (OSError, ValueError) as exc:
            print(f"error: {exits.one_line(exc)}", file=sys.stderr)
            return exits.FAILED
        except Exception as exc:
            if not type(exc).__module__.startswith("ray."):
                raise  # a bug: the traceback says where
            print(f"error: {type(exc).__name__}: {exits.one_line(exc)}", file=sys.stderr)
            return exits.FAILED
