"""Static checks that every gin knob of the package can take effect (issue 14).

gin lets an explicit call argument win over a binding, silently. So a parameter of a configurable that some
caller in the package passes explicitly is a knob a user can bind, validate and sweep without anything
changing. `overridden_knobs` finds those calls; `unread_knobs` finds bindable parameters the function never
reads. Both read the source with `ast` (nothing is imported), so they also run on a made-up module in tests.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Iterable, Iterator


@dataclasses.dataclass(frozen=True)
class Configurable:
    module: str            # rest_jax.losses
    name: str              # bc_kl_weight (the Python name; the gin name may differ)
    gin_name: str          # what a binding uses
    params: tuple[str, ...]   # every parameter, in order (self dropped)
    bindable: frozenset[str]  # those a binding may set
    node: ast.AST


@dataclasses.dataclass(frozen=True)
class Override:
    """`caller` (file:line) passes `params` to configurable `callee`, so their bindings could never apply."""
    where: str
    callee: str
    params: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: passes {', '.join(self.params)} to {self.callee}"


def _is_gin_configurable(decorator: ast.AST) -> ast.Call | ast.Attribute | None:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Attribute) and target.attr == "configurable" and \
            isinstance(target.value, ast.Name) and target.value.id == "gin":
        return decorator
    return None


def _string_list(node: ast.AST | None) -> list[str] | None:
    if node is None:
        return None
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant)]
    return None


def _function_params(fn: ast.FunctionDef) -> list[str]:
    args = fn.args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]


def _class_params(cls: ast.ClassDef) -> list[str]:
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            return _function_params(item)[1:]
    # A dataclass (or a flax Module): its annotated fields, in order.
    return [item.target.id for item in cls.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]


def module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def python_files(package_dir: str) -> Iterator[str]:
    for d, _, files in os.walk(package_dir):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def configurables(trees: dict[str, ast.Module]) -> dict[tuple[str, str], Configurable]:
    """(module, python name) -> Configurable, for every top-level `@gin.configurable` def or class."""
    out = {}
    for module, tree in trees.items():
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for decorator in node.decorator_list:
                decorator = _is_gin_configurable(decorator)
                if decorator is None:
                    continue
                gin_name, allow, deny = node.name, None, []
                if isinstance(decorator, ast.Call):
                    if decorator.args and isinstance(decorator.args[0], ast.Constant):
                        gin_name = decorator.args[0].value
                    for kw in decorator.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            gin_name = kw.value.value
                        elif kw.arg == "allowlist":
                            allow = _string_list(kw.value)
                        elif kw.arg == "denylist":
                            deny = _string_list(kw.value) or []
                params = _class_params(node) if isinstance(node, ast.ClassDef) else _function_params(node)
                bindable = set(allow) if allow is not None else set(params) - set(deny)
                out[(module, node.name)] = Configurable(module, node.name, gin_name, tuple(params),
                                                        frozenset(bindable & set(params)), node)
    return out


def _imports(module: str, tree: ast.Module, modules: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None for the module itself), for imports of package code."""
    modules = set(modules)
    package = module.rsplit(".", 1)[0]
    names: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    names[alias.asname or alias.name] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names[alias.asname or alias.name] = (full, None) if full in modules else (base, alias.name)
    return names


def _resolve(func: ast.AST, module: str, imports: dict[str, tuple[str, str | None]],
             known: dict[tuple[str, str], Configurable]) -> Configurable | None:
    if isinstance(func, ast.Name):
        if (module, func.id) in known:
            return known[(module, func.id)]
        target = imports.get(func.id)
        if target and target[1] is not None:
            return known.get(target)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        target = imports.get(func.value.id)
        if target and target[1] is None:
            return known.get((target[0], func.attr))
    return None


def _with_reexports(trees: dict[str, ast.Module], known: dict[tuple[str, str], Configurable]
                    ) -> dict[tuple[str, str], Configurable]:
    """`known` plus (module, name) for every module that imports a configurable under `name` (a package's
    `__init__` re-exporting its submodules' names: `grow_store.GrowStoreWriter` is `grow_store.writer`'s)."""
    table = dict(known)
    for module, tree in trees.items():
        for local, target in _imports(module, tree, trees).items():
            if target[1] is not None and target in known:
                table.setdefault((module, local), known[target])
    return table


def _is_partial(func: ast.AST) -> bool:
    return (isinstance(func, ast.Name) and func.id == "partial") or \
        (isinstance(func, ast.Attribute) and func.attr == "partial")


def load(package_dir: str) -> dict[str, ast.Module]:
    root = os.path.dirname(os.path.abspath(package_dir))
    trees = {}
    for path in python_files(package_dir):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        tree.filename = os.path.relpath(path, root)  # type: ignore[attr-defined]
        trees[module_name(path, root)] = tree
    return trees


def overridden_knobs(trees: dict[str, ast.Module]) -> list[Override]:
    """Calls (direct or through functools.partial) that pass a bindable parameter of a configurable."""
    known = _with_reexports(trees, configurables(trees))
    found = []
    for module, tree in trees.items():
        imports = _imports(module, tree, trees)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, args = node.func, list(node.args)
            if _is_partial(func) and args:
                func, args = args[0], args[1:]
            callee = _resolve(func, module, imports, known)
            if callee is None:
                continue
            passed = [callee.params[i] for i, a in enumerate(args)
                      if i < len(callee.params) and not isinstance(a, ast.Starred)]
            passed += [kw.arg for kw in node.keywords if kw.arg is not None]
            hit = tuple(p for p in passed if p in callee.bindable)
            if hit:
                found.append(Override(f"{tree.filename}:{node.lineno}", callee.gin_name, hit))
    return found


def unreferenced_configurables(trees: dict[str, ast.Module], entry_points: Iterable[str]) -> list[str]:
    """Configurables nothing in the package names (so a binding of them changes nothing): neither an
    entry point ('module:function'), nor referenced by name outside their own definition, nor put in a
    registry by another decorator (`@register_loss('bc')`)."""
    known = configurables(trees)
    table = _with_reexports(trees, known)
    used = {tuple(e.split(":", 1)) for e in entry_points}
    for module, tree in trees.items():
        imports = _imports(module, tree, trees)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Name, ast.Attribute)):
                c = _resolve(node, module, imports, table)
                if c is not None:
                    used.add((c.module, c.name))
    return sorted(f"{c.module}.{c.name}" for key, c in known.items()
                  if key not in used and len(c.node.decorator_list) == 1)


def unread_knobs(trees: dict[str, ast.Module]) -> list[str]:
    """Bindable parameters of configurable functions that the function body never reads."""
    found = []
    for c in configurables(trees).values():
        if not isinstance(c.node, ast.FunctionDef):
            continue
        read = {n.id for stmt in c.node.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("locals", "vars")
               for stmt in c.node.body for n in ast.walk(stmt)):
            continue
        found += [f"{c.module}.{c.name}: {p}" for p in c.params if p in c.bindable and p not in read]
    return found
