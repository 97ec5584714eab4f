"""Gin parsing and validation for the rest_jax command line, the way T5X users expect it.

The command line (`rest_jax.main`) gathers repeatable `--gin_file`, `--gin.KEY=VALUE` overrides and
`--gin_search_paths`; this module turns them into a parsed, validated gin config, or a `GinConfigError`
with a short message that names the offending flag or file line and suggests close matches.  Nothing here
knows about ReST itself, so tests drive it with throwaway configurables.

Public API:
  `GinConfigError`                   user error in gin files/flags (the CLI prints it, exits with code 2).
  `Binding`                          one binding string plus where it came from (for error messages).
  `binding_from_flag(key, value)`    `--gin.KEY=VALUE` -> `Binding("KEY = VALUE")`, quoting bare paths.
  `default_search_paths()`           cwd and the repository's `configs/` directory.
  `resolve_gin_file(name, paths)`    find a gin file (also `gs://`), with close matches when missing.
  `parse(files, bindings, paths)`    clear gin, then load files and bindings in order.
  `validate(entry, cli_macros)`      unbound / `%gin.REQUIRED` macros, required entry arguments, unused
                                     command-line macros, values of the wrong type; then `gin.finalize()`.
  `macro_value(name, default)`       value of a bound macro (e.g. MODEL_DIR).
  `required_macros(sources, paths)`  static scan: macros a set of gin files needs but does not bind.
  `config_bindings(text)`            a config text (e.g. a saved config.gin) as binding -> value, macros
                                     substituted; `diff_configs(old, new)` lists the bindings that differ.
  `sets_knobs(knobs)`                 declares the callee parameters an entry passes itself; `validate`
                                     rejects bindings of them (they would be silently overridden).
  `save_config(model_dir, text)`     write `config.gin` atomically (local or `gs://`, via etils.epath),
                                     keeping a different earlier one as `config.<k>.gin`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
# gin 0.5.0 reaches for `importlib.util` without importing it when a gin file is missing, which turns
# "file not found" into an AttributeError; importing it here makes gin's own message appear instead.
import importlib.util  # noqa: F401  pylint: disable=unused-import
import inspect
import logging
import operator
import os
import pathlib
import re
import tokenize
import types
import typing
import uuid
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import gin
from etils import epath
from gin import config as gin_config
from gin import config_parser
from gin import resource_reader as gin_resource_reader

REPO_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
PACKAGE_CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / "configs"

# Characters that give a `--gin` value a gin meaning (references, macros, containers, quotes, lists).
_GIN_SYNTAX_CHARS = set("%@()[]{}'\",=#\\ \t")
_AMBIGUOUS_WORDS = {"true", "false", "none", "null"}


class GinConfigError(ValueError):
    """A mistake in gin files or gin flags; its message is meant to be shown without a traceback."""


@dataclasses.dataclass(frozen=True)
class Binding:
    """A gin binding string and the place it came from, e.g. `--gin.train.num_steps=10`."""

    text: str
    source: str

    @property
    def key(self) -> str:
        return self.text.split("=", 1)[0].strip()

    @property
    def is_macro(self) -> bool:
        """Top-level names without a `configurable.` prefix are macros in gin (`MODEL_DIR = ...`)."""
        return "." not in self.key.split("/")[-1]


# --------------------------------------------------------------------------------------------------------
# Flags -> bindings.
# --------------------------------------------------------------------------------------------------------


class _AcceptAllDelegate(config_parser.ParserDelegate):
    """Parser delegate that accepts any reference or macro, for syntax checks and static scans."""

    def __init__(self):
        self.macros: list[str] = []

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _StaticReference("@" + scoped_configurable_name + ("()" if evaluate else ""))

    def macro(self, macro_name):
        self.macros.append(macro_name)
        return _StaticReference("%" + macro_name)


@dataclasses.dataclass(frozen=True)
class _StaticReference:
    text: str

    def __repr__(self) -> str:
        return self.text  # as written in gin: `%MACRO`, `@fn()`


# --------------------------------------------------------------------------------------------------------
# The gin internals used, all here. gin's public API can query or bind one parameter (`gin.query_parameter`,
# `gin.bind_parameter`) but not list the registered configurables or the bindings of the parsed config, which
# the checks below (typos, types, unused and overridden bindings) need. These four functions read them and one
# patches a file reader that raises where it should answer "not here"; tests/test_gin_utils.py compares them
# with gin's public answers, so an upgrade of gin that moves them fails there.
# --------------------------------------------------------------------------------------------------------


def _registered() -> list[tuple[str, Any]]:
    """(complete selector, configurable) of every registered configurable (gin's own `gin.*` ones too)."""
    return list(gin_config._REGISTRY.items())  # pylint: disable=protected-access


def _configurable(selector: str) -> Any:
    """The configurable a (partial) selector names; None when none or several match."""
    try:
        return gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    except KeyError:  # ambiguous
        return None


def _short_selector(selector: str) -> str:
    """The shortest unambiguous form of a complete selector (`rest_jax.train.train` -> `train`)."""
    try:
        return gin_config._REGISTRY.minimal_selector(selector)  # pylint: disable=protected-access
    except KeyError:
        return selector  # not registered in this process: as written


def _parsed_bindings() -> list[tuple[str, str, dict[str, Any]]]:
    """(scope, complete selector, {param: value}) of every binding of the parsed config; macros are
    (NAME, 'gin.macro', {'value': ...})."""
    return [(scope, selector, dict(params))
            for (scope, selector), params in gin_config._CONFIG.items()]  # pylint: disable=protected-access


def _guard_package_resource_reader() -> None:
    """Makes gin's package-resource reader answer "not here" instead of raising.

    For `include 'runs/rest.gin'` gin asks, under each search path in turn starting with the working
    directory, whether `runs` is an importable package holding rest.gin. A `runs/` folder in the working
    directory (the README's first command writes `runs/demo`) is a namespace package without a file, and
    gin's check then raises TypeError, which ended the search before `configs/` was tried.
    """
    readers = gin_config._FILE_READERS  # pylint: disable=protected-access
    for i, (reader, exists) in enumerate(readers):
        if exists is not gin_resource_reader.system_path_file_exists:
            continue

        def safe_exists(path: str, _exists: Callable[[str], bool] = exists) -> bool:
            try:
                return _exists(path)
            except TypeError:
                return False

        readers[i] = (reader, safe_exists)


_guard_package_resource_reader()


def is_gin_value(text: str) -> bool:
    """Whether `text` parses as exactly one gin value (literal, container, @reference or %macro)."""
    try:
        parser = config_parser.ConfigParser(text, _AcceptAllDelegate())
        parser.parse_value()
        return parser.current_token.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
    except (SyntaxError, ValueError, tokenize.TokenError):
        return False


def binding_from_flag(key: str, value: str) -> Binding:
    """Turns `--gin.KEY=VALUE` into a gin binding.

    For convenience an unquoted string is accepted when it cannot mean anything else: the value does not
    parse as gin, contains no gin syntax characters (`% @ ( ) [ ] { } ' " , = #` or spaces) and is not a
    near-keyword (true/false/none).  So `--gin.MODEL_DIR=/tmp/run` and `--gin.MODEL_DIR=gs://b/run` work,
    while `--gin.MODEL_DIR="'/tmp/run'"` (the T5X spelling) works too.

    Raises:
      GinConfigError: empty key or value, or a value that is neither gin nor an unambiguous string.
    """
    source = f"--gin.{key}={value}"
    key = key.strip()
    if not key:
        raise GinConfigError(f"{source}: empty binding key (expected --gin.CONFIGURABLE.PARAM=VALUE "
                             "or --gin.MACRO=VALUE)")
    if value.strip() == "":
        raise GinConfigError(f"{source}: empty value; quote strings, e.g. --gin.{key}=\"'text'\"")
    if not is_gin_value(value):
        bare = not (set(value) & _GIN_SYNTAX_CHARS) and value.lower() not in _AMBIGUOUS_WORDS
        if not bare:
            note = " (True, False and None are capitalised)" if value.lower() in _AMBIGUOUS_WORDS else ""
            raise GinConfigError(
                f"{source}: cannot parse the value {value!r} as gin; strings need quotes, e.g. "
                f"--gin.{key}=\"'{value}'\"{note}")
        logging.info("%s: unquoted value taken as the string %r", source, value)
        value = repr(value)
    return Binding(f"{key} = {value}", source)


# --------------------------------------------------------------------------------------------------------
# Close matches.
# --------------------------------------------------------------------------------------------------------


def close_matches(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to `n` candidates that look like `word` (difflib ratio, case-insensitive)."""
    candidates = sorted(set(candidates))
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=cutoff)
    return [lowered[f] for f in found]


def _did_you_mean(matches: Sequence[str]) -> str:
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def configurable_names(qualified: bool = False) -> list[str]:
    """Registered configurables: short names (`train`), or complete selectors (`rest_jax.train.train`)."""
    names = set()
    for selector, configurable in _registered():
        if not selector.startswith("gin."):
            names.add(selector if qualified else configurable.name)
    return sorted(names)


def parameter_names(configurable_name: str) -> list[str]:
    """Parameters gin may bind on `configurable_name` (empty when unknown or `**kwargs`-only)."""
    configurable = _configurable(configurable_name)
    if configurable is None:
        return []
    fn = configurable.wrapped
    if inspect.isclass(fn):
        fn = fn.__init__
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# --------------------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------------------


def default_search_paths() -> list[str]:
    """Where gin files are looked up when no absolute path is given: cwd, then the repo's configs/."""
    paths = [os.getcwd()]
    for d in (REPO_CONFIGS_DIR, PACKAGE_CONFIGS_DIR):
        if d.is_dir() and str(d) not in paths:
            paths.append(str(d))
    return paths


def _exists(path: str) -> bool:
    try:
        return epath.Path(path).is_file()
    except Exception:  # pylint: disable=broad-except
        # A gs:// path without credentials or a malformed URL counts as missing, not as a crash.
        return False


def _candidates(name: str, search_paths: Sequence[str]) -> list[str]:
    names = [name] if name.endswith(".gin") else [name, name + ".gin"]
    out = []
    for n in names:
        if os.path.isabs(n) or "://" in n:
            out.append(n)
            continue
        out.append(os.path.abspath(n))
        out.extend(os.path.join(p, n) for p in search_paths)
    return out


def list_gin_files(search_paths: Sequence[str], max_depth: int = 4, limit: int = 5000) -> list[str]:
    """Gin files below the local search paths, as names relative to their search path."""
    found: list[str] = []
    for root in search_paths:
        if "://" in root or not os.path.isdir(root):
            continue
        root_depth = root.rstrip(os.sep).count(os.sep)
        for dirpath, dirnames, filenames in os.walk(root):
            # Keep the walk cheap when cwd is a big tree (home dirs, checkpoints).
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("node_modules",)]
            if dirpath.count(os.sep) - root_depth >= max_depth:
                dirnames[:] = []
            for f in filenames:
                if f.endswith(".gin"):
                    found.append(os.path.relpath(os.path.join(dirpath, f), root))
            if len(found) >= limit:
                return found
    return found


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
    """Returns the first existing path for `name` (as given, or below a search path).

    Raises:
      GinConfigError: when it exists nowhere; lists the search paths and similarly named gin files.
    """
    for candidate in _candidates(name, search_paths):
        if _exists(candidate):
            return candidate
    known = list_gin_files(search_paths)
    matches = close_matches(name, known, n=3, cutoff=0.6)
    if not matches:
        base = os.path.basename(name)
        matches = [k for k in known if os.path.basename(k) in close_matches(
            base, [os.path.basename(k) for k in known], n=3, cutoff=0.6)][:3]
    raise GinConfigError(f"--gin_file={name}: file not found (searched {', '.join(search_paths)})."
                         + _did_you_mean(matches))


_ADDED_SEARCH_PATHS: set[str] = set()


def _register_search_paths(search_paths: Sequence[str]) -> None:
    for p in search_paths:
        if p not in _ADDED_SEARCH_PATHS:  # gin keeps every addition, duplicates too, and searches them all
            gin.add_config_file_search_path(p)
            _ADDED_SEARCH_PATHS.add(p)


def _epath_reader(path: str):
    return epath.Path(path).open("r")


def _is_remote_file(path: str) -> bool:
    return "://" in path and _exists(path)


# Lets gin `include` statements and --gin_file reach gs:// (epath uses tf.io.gfile / gcsfs).
gin_config.register_file_reader(_epath_reader, _is_remote_file)




# --------------------------------------------------------------------------------------------------------
# Parsing with clear errors.
# --------------------------------------------------------------------------------------------------------

_LOCATION_RE = re.compile(r'In file "(?P<file>[^"]+)", line (?P<line>\d+)')


def _location(message_lines: Sequence[str]) -> str:
    """Compresses gin's multi-line location trailer into `file:line: content`."""
    for i, line in enumerate(message_lines):
        m = _LOCATION_RE.search(line)
        if m:
            content = message_lines[i + 1].strip() if i + 1 < len(message_lines) else ""
            return f"{m['file']}:{m['line']}: {content}"
    return ""


def _explain(exc: BaseException, source: str) -> GinConfigError:
    """Turns a gin exception into a short message with close matches."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    first = lines[0].strip()
    where = _location(lines) or source
    hint = ""
    if m := re.search(r"No configurable matching reference '@?([^'(]+)", first):
        name = m[1].split("/")[-1]
        hint = _did_you_mean(close_matches(name, configurable_names(qualified="." in name)))
        first = f"unknown configurable reference @{name}"
    elif m := re.search(r"No configurable matching '([^']+)'", first):
        name = m[1]
        hint = _did_you_mean(close_matches(name, configurable_names(qualified="." in name))) or (
            " Configurables register when their module is imported: check the spelling or add an "
            "`import` line for the module to a gin file.")
        first = f"unknown configurable {name!r}"
    elif m := re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", first):
        hint = _did_you_mean(close_matches(m[2], parameter_names(m[1])))
        first = f"{m[1]!r} has no parameter {m[2]!r}"
    elif isinstance(exc, SyntaxError):
        first = f"syntax error: {exc.msg}"
        if exc.filename and exc.lineno:
            where = f"{exc.filename}:{exc.lineno}: {(exc.text or '').strip()}"
        hint = " Strings need quotes, e.g. --gin.MODEL_DIR=\"'/tmp/run'\"."
    elif m := re.search(r"Unable to open file: ([^.]+(?:\.gin)?)", first):
        first = f"included gin file {m[1]!r} not found"
    elif isinstance(exc, ImportError):
        first = f"import in gin config failed: {first}"
    return GinConfigError(f"{where}: {first}.{hint}" if where else f"{first}.{hint}")


class _QuietGinResourceReader(logging.Filter):
    """gin's package-resource reader logs an ERROR for every search path that lacks an included file,
    even when a later path has it; those lines alarm users and say nothing our own errors do not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.module != "resource_reader"


def parse(gin_files: Sequence[str], bindings: Sequence[Binding],
          search_paths: Sequence[str] | None = None) -> list[str]:
    """Clears gin, then parses `gin_files` and `bindings` in order (later ones win), T5X-style.

    Returns:
      The resolved gin file paths.
    Raises:
      GinConfigError: missing file, syntax error, unknown configurable/parameter (with close matches).
    """
    search_paths = list(search_paths) if search_paths is not None else default_search_paths()
    _register_search_paths(search_paths)
    gin.clear_config()  # also unlocks a finalized config
    _PARSED.update(files=[], bindings=list(bindings), search_paths=search_paths)
    quiet = _QuietGinResourceReader()
    logging.getLogger().addFilter(quiet)
    try:
        resolved = _parse(gin_files, bindings, search_paths)
    finally:
        logging.getLogger().removeFilter(quiet)
    _PARSED["files"] = resolved
    expand_user_paths()
    return resolved


# Where the current gin config came from (set by `parse`), to name the file line or flag of a bad value.
_PARSED: dict[str, list[Any]] = {"files": [], "bindings": [], "search_paths": []}


def _parse(gin_files: Sequence[str], bindings: Sequence[Binding], search_paths: Sequence[str]) -> list[str]:
    resolved = [resolve_gin_file(f, search_paths) for f in gin_files]
    for name, path in zip(gin_files, resolved):
        try:
            gin.parse_config_file(path)
        except (ValueError, SyntaxError, IOError, ImportError, TypeError, tokenize.TokenError) as e:
            raise _explain(e, f"--gin_file={name}") from e
        except RecursionError:
            # gin follows `include` without remembering where it has been: a cycle ends in a RecursionError
            # thousands of lines long.  Name the cycle instead.
            raise GinConfigError(_include_cycle(path, name, search_paths) or f"--gin_file={name}: includes nest "
                                 "too deeply (a recursive include?)") from None
    for b in bindings:
        try:
            gin.parse_config(b.text)
        except (ValueError, SyntaxError, IOError, ImportError, TypeError, tokenize.TokenError) as e:
            # gin's own location would say "bindings string line 1"; the flag itself is clearer.
            raise _explain(e, b.source) from e
    return resolved


def _include_statements(path: str) -> list[config_parser.IncludeStatement]:
    try:
        return [stmt for stmt in config_parser.ConfigParser(epath.Path(path).read_text(), _AcceptAllDelegate())
                if isinstance(stmt, config_parser.IncludeStatement)]
    except (OSError, SyntaxError, ValueError, tokenize.TokenError):
        return []


def _include_cycle(path: str, name: str, search_paths: Sequence[str]) -> str | None:
    """`file:line: recursive include: a.gin -> b.gin -> a.gin` for the first include cycle below `path`."""

    def visit(path: str, chain: list[tuple[str, str]]) -> str | None:
        for stmt in _include_statements(path):
            try:
                target = resolve_gin_file(stmt.filename, search_paths)
            except GinConfigError:
                continue
            real = os.path.realpath(target) if "://" not in target else target
            names = [name for _, name in chain] + [stmt.filename]
            if real in (r for r, _ in chain):
                return f"{path}:{stmt.location.line_num}: recursive include: {' -> '.join(names)}"
            found = visit(target, chain + [(real, stmt.filename)])
            if found:
                return found
        return None

    return visit(path, [(os.path.realpath(path) if "://" not in path else path, name)])


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_map_strings(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def _expand_user(text: str) -> str:
    return os.path.expanduser(text) if text == "~" or text.startswith("~/") else text


def expand_user_paths() -> None:
    """Expands a leading `~/` in every string value of the parsed config (macros, parameters, containers).

    A shell expands `~` only in unquoted words, so `--gin.MODEL_DIR="'~/run'"` reached gin as the literal
    `~/run` and created a folder named `~`.  Any string that starts with `~/` is taken for a home-relative
    path; `gs://...` and other strings are left alone.
    """
    for scope, selector, params in _parsed_bindings():
        for param, value in params.items():
            expanded = _map_strings(value, _expand_user)
            if expanded != value:
                gin.bind_parameter((scope, selector, param), expanded)  # a macro: (NAME, 'gin.macro', 'value')


# --------------------------------------------------------------------------------------------------------
# Validation of a parsed config.
# --------------------------------------------------------------------------------------------------------


def _is_macro(value: Any) -> bool:
    return isinstance(value, gin_config.ConfigurableReference) and value.configurable.selector == "gin.macro"


def _is_required(value: Any) -> bool:
    return (isinstance(value, gin_config.ConfigurableReference)
            and value.configurable.selector == "gin.constant" and value.scopes == ["gin.REQUIRED"])


def _flatten(value: Any) -> Iterator[Any]:
    """Every value nested in `value` (containers' items, then the container itself), strings not split."""
    if isinstance(value, collections.abc.Mapping):
        for item in value.values():
            yield from _flatten(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _flatten(item)
    yield value


def _binding_name(scope: str, selector: str, param: str) -> str:
    if selector == "gin.macro":
        return f"macro {scope}"
    return f"{scope + '/' if scope else ''}{_short_selector(selector)}.{param}"


def macro_references() -> dict[str, list[str]]:
    """Macro name -> the bindings that use it, over the whole parsed config."""
    refs: dict[str, list[str]] = {}
    for scope, selector, params in _parsed_bindings():
        for param, value in params.items():
            for v in _flatten(value):
                if _is_macro(v):
                    refs.setdefault("/".join(v.scopes), []).append(_binding_name(scope, selector, param))
    return refs


def bound_macros() -> dict[str, Any]:
    """Macro name -> bound value (gin references unevaluated)."""
    return {scope: params["value"]
            for scope, selector, params in _parsed_bindings() if selector == "gin.macro" and "value" in params}


def macro_value(name: str, default: Any = None) -> Any:
    """The value bound to macro `name` (references to other macros followed), else `default`."""
    macros = bound_macros()
    seen = set()
    while name in macros and name not in seen:
        seen.add(name)
        value = macros[name]
        if _is_macro(value):
            name = "/".join(value.scopes)
            continue
        if _is_required(value):
            return default
        return value
    return default


def bound_setting(selector: str, fn: Callable[..., Any], fallback: Any = None) -> Any:
    """`selector` ('train.batch_size') as the parsed config binds it, macros resolved; unbound: `fn`'s default
    for that parameter, else `fallback`. What `fn` will be called with, read without calling it."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        param = inspect.signature(inspect.unwrap(fn)).parameters.get(selector.rsplit(".", 1)[-1])
        return fallback if param is None or param.default in (param.empty, gin.REQUIRED) else param.default
    value = _resolve_macros(value, bound_macros())
    return fallback if value is _UNRESOLVED or _is_required(value) else value


def _entry_required_args(entry: Callable[..., Any]) -> list[str]:
    """Entry-function arguments with no default (or `gin.REQUIRED`) that gin does not bind."""
    try:
        bound = gin.get_bindings(entry)
    except (ValueError, TypeError):
        return []  # Not a gin configurable: nothing gin could have bound.
    fn = inspect.unwrap(entry)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and (p.default is p.empty or p.default is gin.REQUIRED)
            and p.name not in bound]


# --------------------------------------------------------------------------------------------------------
# Types of bound values, from the configurables' type hints.
# --------------------------------------------------------------------------------------------------------


class _Unresolved:
    """A reference (`@fn`, `@fn()`) or unbound macro: its value is known only when the program runs."""

    def __repr__(self) -> str:
        return "<reference>"


_UNRESOLVED = _Unresolved()
_SEQUENCES = {list, tuple, collections.abc.Sequence, collections.abc.MutableSequence, collections.abc.Iterable,
              collections.abc.Collection}
_MAPPINGS = {dict, collections.abc.Mapping, collections.abc.MutableMapping}


def _resolve_macros(value: Any, macros: Mapping[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`value` with macros replaced by their bound values (deeply); references become `_UNRESOLVED`."""
    if _is_macro(value):
        name = "/".join(value.scopes)
        if name in macros and name not in seen:
            return _resolve_macros(macros[name], macros, (*seen, name))
        return _UNRESOLVED
    if isinstance(value, gin_config.ConfigurableReference):
        return _UNRESOLVED
    if type(value) in (list, tuple):
        return type(value)(_resolve_macros(v, macros, seen) for v in value)
    if isinstance(value, dict):
        return {k: _resolve_macros(v, macros, seen) for k, v in value.items()}
    return value


def _parameter_types(configurable: Any) -> dict[str, tuple[Any, Any]]:
    """Parameter name -> (type hint, default) for the annotated parameters of a registered configurable."""
    fn = configurable.wrapped
    try:
        params = inspect.signature(fn).parameters  # a class: its constructor's, without self
    except (TypeError, ValueError):
        return {}
    targets = [fn.__init__, fn] if inspect.isclass(fn) else [fn]
    hints: dict[str, Any] = {}
    for target in targets:
        try:
            hints = typing.get_type_hints(target)
            break
        except Exception:  # pylint: disable=broad-except
            # One annotation that does not resolve (e.g. a name imported only for type checkers) spoils
            # get_type_hints for all of them; such parameters are not checked.
            continue
    return {name: (hints[name], p.default) for name, p in params.items() if name in hints}


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (a gin literal, macros resolved) can be meant for a parameter hinted `hint`.

    Lenient on purpose: only plain types, unions, Literal and standard containers are checked; an int is
    fine for a float, an integral float for an int, a list for a tuple; any other class passes.
    """
    if value is _UNRESOLVED or hint is Any or hint is object:
        return True
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if hint is bool:
        return type(value) is bool or (type(value) is int and value in (0, 1))
    if hint is int:
        return type(value) is int or (type(value) is float and value.is_integer())
    if hint is float:
        return type(value) in (int, float)
    if hint is str:
        return isinstance(value, str)
    if origin in _SEQUENCES:
        if type(value) not in (list, tuple):
            return False  # a string where a sequence of values is meant would be taken letter by letter
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return (len(value) == 0) if args == ((),) else (
                len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args)))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return True


def _type_name(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "None"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _canonical_key(scope: str, selector: str, param: str) -> tuple[str, str, str]:
    """(scope, complete selector, param) as gin stores a binding; a macro is (NAME, 'gin.macro', 'value')."""
    if not param:
        return (f"{scope}/{selector}" if scope else selector), "gin.macro", "value"
    configurable = _configurable(selector)
    return scope, configurable.selector if configurable is not None else selector, param


def _file_bindings(path: str, search_paths: Sequence[str], depth: int = 0
                   ) -> Iterator[tuple[str, config_parser.BindingStatement]]:
    """The binding statements of gin file `path` with its includes, in the order gin applies them."""
    try:
        statements = list(config_parser.ConfigParser(epath.Path(path).read_text(), _AcceptAllDelegate()))
    except (OSError, SyntaxError, ValueError, tokenize.TokenError):
        return
    for stmt in statements:
        if isinstance(stmt, config_parser.BindingStatement):
            yield path, stmt
        elif isinstance(stmt, config_parser.IncludeStatement) and depth < 20:
            try:
                included = resolve_gin_file(stmt.filename, search_paths)
            except GinConfigError:
                continue
            yield from _file_bindings(included, search_paths, depth + 1)


def _source_of(key: tuple[str, str, str]) -> str:
    """The flag or `file:line` that last bound `key` in the config `parse` loaded ('' if unknown)."""
    for b in reversed(_PARSED["bindings"]):
        try:
            statements = list(config_parser.ConfigParser(b.text, _AcceptAllDelegate()))
        except (SyntaxError, ValueError, tokenize.TokenError):
            continue
        if any(isinstance(st, config_parser.BindingStatement) and _canonical_key(*st[:3]) == key
               for st in statements):
            return b.source
    found = ""
    for gin_file in _PARSED["files"]:
        for path, stmt in _file_bindings(gin_file, _PARSED["search_paths"]):
            if _canonical_key(*stmt[:3]) == key:
                found = f"{path}:{stmt.location.line_num}"
    return found


def _type_problems() -> list[str]:
    """`source: configurable.param expects T, got V` for each bound value its parameter's hint rules out."""
    macros = bound_macros()
    problems = []
    for scope, selector, params in _parsed_bindings():
        if selector.startswith("gin."):
            continue
        configurable = _configurable(selector)
        types_ = _parameter_types(configurable) if configurable is not None else {}
        for param, value in params.items():
            if param not in types_:
                continue
            hint, default = types_[param]
            resolved = _resolve_macros(value, macros)
            if (resolved is None and default is None) or _fits(resolved, hint):
                continue
            key, via, seen = (scope, selector, param), "", set()
            # Name the macro that holds the value (x.y = %A, A = %B, B = 'abc': B).
            while _is_macro(value) and (name := "/".join(value.scopes)) in macros and name not in seen:
                seen.add(name)
                via, key, value = name, (name, "gin.macro", "value"), macros[name]
            source = _source_of(key)
            problems.append(f"{source + ': ' if source else ''}{_binding_name(scope, selector, param)} expects "
                            f"{_type_name(hint)}, got {resolved!r}" + (f" (through macro {via})" if via else ""))
    return problems


def _how_to_set(macro: str) -> str:
    return f"--gin.{macro}=..." + (" or --model_dir=..." if macro == "MODEL_DIR" else "")


def sets_knobs(knobs: Mapping[str, str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declares the callee parameters an entry function passes itself, each with what to do instead.

    gin lets an explicit argument win over a binding, so binding e.g. `train.seed` under `rest_jax rest`
    (which passes `seed=` from `run_rest.seed`) would change nothing. `validate` rejects such bindings and
    names the knob to use instead. Put it below `@gin.configurable` (gin's wrapper copies the attribute).

        @gin.configurable
        @gin_utils.sets_knobs({"train.seed": "set run_rest.seed instead"})
        def run_rest(seed: int = 0): ...
    """
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.sets_knobs = dict(knobs)  # type: ignore[attr-defined]
        return fn
    return mark


def _overridden_bindings(entry: Callable[..., Any] | None) -> list[str]:
    """Bindings of parameters that `entry` passes explicitly (see `sets_knobs`): they could never apply."""
    knobs = getattr(entry, "sets_knobs", None) or {}
    name = getattr(entry, "__name__", "the entry")
    problems = []
    for scope, selector, params in _parsed_bindings():
        if selector == "gin.macro":
            continue
        for param in params:
            knob = f"{selector.rsplit('.', 1)[-1]}.{param}"
            if knob in knobs:
                problems.append(f"{_binding_name(scope, selector, param)} has no effect: {name}() passes it "
                                f"itself; {knobs[knob]}.")
    return problems


def validate(entry: Callable[..., Any] | None = None, cli_bindings: Sequence[Binding] = (),
             always_used_macros: Iterable[str] = ("MODEL_DIR",)) -> None:
    """Checks the parsed config before anything runs, then locks it (`gin.finalize`).

    Args:
      entry: the function about to be called with no arguments; its required arguments must be bound.
      cli_bindings: the command-line bindings; a macro set there that nothing uses is an error when it
        looks like a typo of a used macro, a warning otherwise.
      always_used_macros: macros the caller reads itself (the CLI reads MODEL_DIR), never "unused".
    Raises:
      GinConfigError: unbound macro, `%gin.REQUIRED` left in place, unbound entry argument, typo'd macro,
        a value of the wrong type for its parameter's type hint (e.g. a string for an int), a binding the
        entry would override (`sets_knobs`).
    """
    refs = macro_references()
    bound = bound_macros()
    problems = []
    for name, users in refs.items():
        if name not in bound:
            problems.append(f"macro {name} is required but not set (used by {', '.join(sorted(set(users)))})."
                            f" Set it with {_how_to_set(name)}" + _did_you_mean(close_matches(name, bound)))
    for name, value in bound.items():
        if _is_required(value):
            problems.append(f"macro {name} is required (%gin.REQUIRED) but not set. Set it with "
                            f"{_how_to_set(name)}" + _did_you_mean(close_matches(name, set(bound) - {name})))
    for scope, selector, params in _parsed_bindings():
        if selector == "gin.macro":
            continue
        for param, value in params.items():
            if _is_required(value):
                key = _binding_name(scope, selector, param)
                problems.append(f"{key} is required (%gin.REQUIRED) but not set. Set it with --gin.{key}=...")
    if entry is not None:
        name = getattr(entry, "__name__", str(entry))
        for arg in _entry_required_args(entry):
            problems.append(f"{name}() needs argument {arg!r}, which no gin binding sets. Set it with "
                            f"--gin.{name}.{arg}=... or in a gin file.")
    problems += _overridden_bindings(entry)
    problems += _type_problems()
    used = set(refs) | set(always_used_macros)
    for b in cli_bindings:
        if b.is_macro and b.key not in used:
            matches = close_matches(b.key, set(refs) | set(bound) - {b.key})
            if matches:
                problems.append(f"{b.source}: macro {b.key} is not used by any binding." + _did_you_mean(matches))
            else:
                logging.warning("%s: macro %s is not used by any binding", b.source, b.key)
    if problems:
        raise GinConfigError("\n".join(problems))
    try:
        gin.finalize()
    except (ValueError, TypeError, RuntimeError) as e:
        raise _explain(e, "") from e


# --------------------------------------------------------------------------------------------------------
# Static scan of gin files (for --help): which macros they need.
# --------------------------------------------------------------------------------------------------------


def _scan(text: str, filename: str, search_paths: Sequence[str], defined: dict[str, Any],
          referenced: list[str], depth: int = 0) -> None:
    delegate = _AcceptAllDelegate()
    for stmt in config_parser.ConfigParser(text, delegate):
        if isinstance(stmt, config_parser.BindingStatement) and not stmt.arg_name:
            name = f"{stmt.scope}/{stmt.selector}" if stmt.scope else stmt.selector
            defined[name] = stmt.value
        elif isinstance(stmt, config_parser.IncludeStatement) and depth < 20:
            try:
                path = resolve_gin_file(stmt.filename, [os.path.dirname(filename), *search_paths])
            except GinConfigError:
                continue
            _scan(epath.Path(path).read_text(), path, search_paths, defined, referenced, depth + 1)
    referenced.extend(m for m in delegate.macros if not m.startswith("gin."))


def required_macros(sources: Sequence[str], search_paths: Sequence[str] | None = None,
                    extra_bindings: Sequence[str] = ()) -> list[str]:
    """Macros that `sources` (gin files, in order, with their includes) and `extra_bindings` reference
    but never bind, or bind to `%gin.REQUIRED`; in order of first appearance.  Nothing is imported."""
    search_paths = list(search_paths) if search_paths is not None else default_search_paths()
    defined: dict[str, Any] = {}
    referenced: list[str] = []
    for src in sources:
        path = resolve_gin_file(src, search_paths)
        _scan(epath.Path(path).read_text(), path, search_paths, defined, referenced)
    if extra_bindings:
        _scan("\n".join(extra_bindings), "<flags>", search_paths, defined, referenced)
    order = list(dict.fromkeys([*referenced, *defined]))
    required = _StaticReference("%gin.REQUIRED")
    return [m for m in order if (m not in defined and m in referenced) or defined.get(m) == required]


# --------------------------------------------------------------------------------------------------------
# Comparing configs (a saved config.gin against the one about to run).
# --------------------------------------------------------------------------------------------------------


def _substitute(value: Any, macros: Mapping[str, Any], opaque: Iterable[str], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(value, _StaticReference) and value.text.startswith("%"):
        name = value.text[1:]
        if name in macros and name not in opaque and name not in seen:
            return _substitute(macros[name], macros, opaque, (*seen, name))
        return value
    if type(value) in (list, tuple):
        return type(value)(_substitute(v, macros, opaque, seen) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, macros, opaque, seen) for k, v in value.items()}
    return value


def config_bindings(text: str, opaque_macros: Iterable[str] = ()) -> dict[tuple[str, str, str], Any]:
    """The parameter bindings of a gin config text (e.g. a saved config.gin) as
    (scope, complete selector, param) -> value, with every macro replaced by its value (except
    `opaque_macros`, kept as `%NAME`), so that a macro and the bindings using it compare as the values
    they give.  References stay as written (`@fn()`).  Nothing is imported or bound.

    Raises:
      SyntaxError, ValueError: `text` is not gin.
    """
    macros: dict[str, Any] = {}
    params: dict[tuple[str, str, str], Any] = {}
    for stmt in config_parser.ConfigParser(text, _AcceptAllDelegate()):
        if isinstance(stmt, config_parser.BindingStatement):
            key = _canonical_key(*stmt[:3])
            if key[1] == "gin.macro":
                macros[key[0]] = stmt.value
            else:
                params[key] = stmt.value
    opaque = set(opaque_macros)
    return {k: _substitute(v, macros, opaque) for k, v in params.items()}


_NO_DEFAULT = object()


def _default(key: tuple[str, str, str]) -> Any:
    configurable = _configurable(key[1])
    if configurable is None:
        return _NO_DEFAULT
    try:
        param = inspect.signature(configurable.wrapped).parameters.get(key[2])
    except (TypeError, ValueError):
        return _NO_DEFAULT
    if param is None or param.default is param.empty or param.default is gin.REQUIRED:
        return _NO_DEFAULT
    return param.default


def diff_configs(old: str, new: str, opaque_macros: Iterable[str] = (),
                 same: Callable[[Any, Any], bool] = operator.eq) -> list[tuple[str, str, str]]:
    """Bindings whose values differ between two gin config texts, as (binding, old value, new value).

    Macros are compared through the bindings that use them (`config_bindings`); a binding present on one
    side only counts as its parameter's default there.  Values are shown as gin would write them.  `same`
    decides whether two values are equal (e.g. two spellings of one path).
    """
    a, b = config_bindings(old, opaque_macros), config_bindings(new, opaque_macros)
    out = []
    for key in sorted(set(a) | set(b)):
        (va, how_a), (vb, how_b) = _lookup(a, key), _lookup(b, key)
        if same(va, vb):
            continue
        out.append((_display_key(key), *(("(not set)" if v is _NO_DEFAULT else repr(v)) + how
                                          for v, how in ((va, how_a), (vb, how_b)))))
    return out


def _lookup(bindings: Mapping[tuple[str, str, str], Any], key: tuple[str, str, str]) -> tuple[Any, str]:
    """The value `key` gets from `bindings` as gin would give it: its own binding, else the same parameter
    bound in an enclosing scope (`a/b` -> `a` -> none), else the parameter's default; and how it got it."""
    scope, selector, param = key
    while True:
        if (scope, selector, param) in bindings:
            value = bindings[(scope, selector, param)]
            return value, "" if scope == key[0] else f" (from {_display_key((scope, selector, param))})"
        if not scope:
            default = _default(key)
            return default, "" if default is _NO_DEFAULT else " (default)"
        scope = scope.rsplit("/", 1)[0] if "/" in scope else ""


def _display_key(key: tuple[str, str, str]) -> str:
    scope, selector, param = key
    return f"{scope + '/' if scope else ''}{_short_selector(selector)}.{param}"


# --------------------------------------------------------------------------------------------------------
# Saving the config.
# --------------------------------------------------------------------------------------------------------


def save_config(model_dir: str | os.PathLike[str], text: str, filename: str = "config.gin") -> epath.Path:
    """Writes `text` to `model_dir/filename` (local or gs://): temp name, then rename, so a crash never
    leaves half a config behind.

    A different config already there (an earlier run of the same directory, e.g. before a rerun with other
    overrides that then failed) is kept as `<stem>.<k>.gin`, k = 1, 2, ... in the order they were replaced.
    """
    directory = epath.Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / filename
    if final.exists() and final.read_text() != text:
        stem, suffix = os.path.splitext(filename)
        k = 1
        while (directory / f"{stem}.{k}{suffix}").exists():
            k += 1
        final.rename(directory / f"{stem}.{k}{suffix}")
    tmp = directory / f".{filename}.tmp-{uuid.uuid4().hex}"
    tmp.write_text(text)
    tmp.replace(final)
    return final
