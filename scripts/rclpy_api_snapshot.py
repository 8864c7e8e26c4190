"""Writes the public API of one rclpy release (module names, functions' and methods' parameters) as JSON,
read from its sources, so that tests can check our code against a ROS 2 distribution not installed here.

    python scripts/rclpy_api_snapshot.py <ros2/rclpy git dir> <ref> > tests/data/rclpy_api/<distro>.json

e.g. `humble` (ROS 2 Humble, Python 3.10) or `jazzy`. Only the sources are read (git show), nothing runs.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys


def git(repo: str, *args: str) -> str:
    return subprocess.run(['git', '-C', repo, *args], check=True, capture_output=True, text=True).stdout


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    """Parameter names (without self/cls); '**' when it takes **kwargs."""
    args = function.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    if method and names and names[0] in ('self', 'cls') and not any(
            isinstance(d, ast.Name) and d.id == 'staticmethod' for d in function.decorator_list):
        names = names[1:]
    return names + (['**'] if args.kwarg else [])


def resolve(module: str, level: int, target: str | None) -> str:
    """Absolute module of `from <level dots><target> import ...` inside `module` (a package's __init__ too)."""
    if level == 0:
        return target or ''
    parts = module.split('.')
    base = parts[:len(parts) - level + (1 if module in PACKAGES else 0)]
    return '.'.join(base + ([target] if target else []))


PACKAGES: set[str] = set()


def snapshot(repo: str, ref: str) -> dict:
    files = [f for f in git(repo, 'ls-tree', '-r', '--name-only', ref, 'rclpy/rclpy').split()
             if f.endswith('.py')]
    modules = {}
    for path in files:
        name = path[len('rclpy/'):-3].replace('/', '.')
        if name.endswith('.__init__'):
            name = name[:-len('.__init__')]
            PACKAGES.add(name)
        modules[name] = ast.parse(git(repo, 'show', f'{ref}:{path}'))
    names, aliases, classes, functions, bases, stars = {}, {}, {}, {}, {}, {}
    for module, tree in modules.items():
        found = set()
        for stmt in tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.add(stmt.name)
                functions[f'{module}.{stmt.name}'] = parameters(stmt, method=False)
            elif isinstance(stmt, ast.ClassDef):
                found.add(stmt.name)
                members = {}
                for item in stmt.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members[item.name] = parameters(item, method=True)
                    elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                        for target in (item.targets if isinstance(item, ast.Assign) else [item.target]):
                            if isinstance(target, ast.Name):
                                members[target.id] = None
                    for node in ast.walk(item):  # instance attributes set in methods (self.x = ...)
                        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                                isinstance(node.value, ast.Name) and node.value.id == 'self':
                            members.setdefault(node.attr, None)
                classes[f'{module}.{stmt.name}'] = members
                bases[f'{module}.{stmt.name}'] = [ast.unparse(b) for b in stmt.bases]
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                for target in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                    if isinstance(target, ast.Name):
                        found.add(target.id)
            elif isinstance(stmt, ast.ImportFrom):
                source = resolve(module, stmt.level, stmt.module)
                if stmt.names[0].name == '*':  # a re-exporting shim (e.g. Jazzy's deprecated rclpy.qos_event)
                    stars.setdefault(module, []).append(source)
                    continue
                for alias in stmt.names:
                    found.add(alias.asname or alias.name)
                    aliases[f'{module}.{alias.asname or alias.name}'] = f'{source}.{alias.name}'
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    found.add(alias.asname or alias.name.split('.')[0])
        names[module] = sorted(found | {m.rsplit('.', 1)[1] for m in modules if m.rpartition('.')[0] == module})

    for module, sources in stars.items():
        for source in sources:
            names[module] = sorted(set(names[module]) | {n for n in names.get(source, []) if not n.startswith('_')})
            for name in names.get(source, []):
                aliases.setdefault(f'{module}.{name}', f'{source}.{name}')

    def canonical(qualname: str) -> str:
        seen = set()
        while qualname in aliases and qualname not in seen:
            seen.add(qualname)
            qualname = aliases[qualname]
        return qualname

    def flattened(qualname: str, depth: int = 0) -> dict:
        module = qualname.rsplit('.', 1)[0]
        members = {}
        for base in bases.get(qualname, []):
            base_name = canonical(f'{module}.{base}') if '.' not in base else canonical(base)
            if base_name in classes and depth < 10:
                members.update(flattened(base_name, depth + 1))
        members.update(classes[qualname])
        return members

    return {
        'source': f"ros2/rclpy {ref} {git(repo, 'rev-parse', '--short', ref).strip()}",
        'names': names,
        'aliases': {k: canonical(v) for k, v in sorted(aliases.items()) if v.startswith('rclpy')},
        'classes': {q: flattened(q) for q in sorted(classes)},
        'functions': dict(sorted(functions.items())),
    }


if __name__ == '__main__':
    json.dump(snapshot(sys.argv[1], sys.argv[2]), sys.stdout, indent=0, sort_keys=True)
    print()
