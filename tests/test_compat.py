"""What can be checked here of ROS 2 Jazzy (Python 3.12) and Humble (Python 3.10) support without either:
the package's syntax and standard library for Python 3.10 (ruff, vermin), and every rclpy name, method
and keyword it uses against each distribution's rclpy API, read from its sources
(tests/data/rclpy_api/<distro>.json, written by scripts/rclpy_api_snapshot.py from ros2/rclpy)."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'ros_ws' / 'src' / 'flmm_ros'
SOURCES = [PACKAGE / 'flmm_ros', PACKAGE / 'launch', PACKAGE / 'setup.py']
API = ROOT / 'tests' / 'data' / 'rclpy_api'
# Code under one of these (try: ... except <these>, or `if hasattr(...)`) is a guarded fallback.
GUARD_EXCEPTIONS = {'AttributeError', 'ImportError', 'ModuleNotFoundError', 'TypeError'}


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (pinned in requirements.txt; run scripts/setup.sh)")
    return path


def test_syntax_is_python_3_10():
    """ruff's syntax errors for py310 (e.g. PEP 695 generics, PEP 701 f-strings) and undefined names."""
    result = subprocess.run([tool('ruff'), 'check', '--no-cache', '--isolated', '--target-version', 'py310',
                             '--select', 'E9,F63,F7,F82', '--output-format', 'concise', *map(str, SOURCES)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_standard_library_use_is_python_3_10():
    """vermin knows when each stdlib module, function and argument appeared (tomllib, typing.Self, ...)."""
    result = subprocess.run([tool('vermin'), '--no-tips', '--violations', '--eval-annotations', '-t=3.10-',
                             *map(str, SOURCES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_vermin_catches_a_python_3_11_module(tmp_path):
    """The check above can fail: a 3.11-only import is reported."""
    (tmp_path / 'new.py').write_text('import tomllib\n')
    result = subprocess.run([tool('vermin'), '--no-tips', '--violations', '-t=3.10-', str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and 'tomllib' in result.stdout


def class_members(node: ast.ClassDef) -> set[str]:
    """Methods of a class and the attributes its methods assign (self.x = ...)."""
    own = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    own |= {t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    own |= {t.attr for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == 'self'}
    return own


def first_party_members(module: str, name: str) -> set[str]:
    """Members of class `name` in this package's `module` (flmm_ros.x.y), with its same-file bases."""
    path = PACKAGE / Path(*module.split('.')).with_suffix('.py')
    if not path.is_file():
        return set()
    classes = {c.name: c for c in ast.parse(path.read_text()).body if isinstance(c, ast.ClassDef)}
    members, todo = set(), [name]
    while todo:
        cls = classes.get(todo.pop())
        if cls is not None:
            members |= class_members(cls)
            todo += [b.id for b in cls.bases if isinstance(b, ast.Name)]
    return members


class RclpyUses(ast.NodeVisitor):
    """rclpy names, methods and keywords used outside guarded fallbacks, checked against one API snapshot."""

    def __init__(self, api: dict, path: Path):
        self.api, self.path, self.problems = api, path, []
        self.imported: dict[str, str] = {}  # local name -> rclpy qualified name
        self.first_party: dict[str, tuple[str, str]] = {}  # local name -> (flmm_ros module, class name)
        self.node_classes: list[tuple[str, set[str]]] = []  # (rclpy base class, names our class defines)
        self.guarded = 0

    def canonical(self, name: str) -> str:
        while name in self.api['aliases']:
            name = self.api['aliases'][name]
        return name

    def exists(self, qualname: str) -> bool:
        if qualname in self.api['names']:
            return True  # a module
        owner, _, name = qualname.rpartition('.')
        if not owner:
            return False
        if owner in self.api['names']:
            return name in self.api['names'][owner]
        cls = self.canonical(owner)
        if cls in self.api['classes']:
            return name in self.api['classes'][cls]
        # A member of something the sources do not describe (an enum of the C extension, e.g.
        # SignalHandlerOptions.NO): the owner itself must exist.
        return self.exists(owner)

    def problem(self, node: ast.AST, text: str) -> None:
        if not self.guarded:
            where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
            self.problems.append(f"{where}:{node.lineno}: {text}")

    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.imported.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f'{base}.{node.attr}' if base else None
        return None

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split('.')[0] == 'rclpy':
                if alias.name not in self.api['names']:
                    self.problem(node, f"module {alias.name} does not exist")
                self.imported[alias.asname or 'rclpy'] = alias.name if alias.asname else 'rclpy'

    def visit_ImportFrom(self, node):
        if (node.module or '').split('.')[0] == 'flmm_ros':
            self.first_party.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        if (node.module or '').split('.')[0] != 'rclpy':
            return
        for alias in node.names:
            qualname = f'{node.module}.{alias.name}'
            if not self.exists(qualname):
                self.problem(node, f"{qualname} does not exist")
            self.imported[alias.asname or alias.name] = qualname

    def visit_Try(self, node):
        caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        names = {n.strip('() ') for c in caught for n in c.split(',')}
        guarded = bool(names & GUARD_EXCEPTIONS)
        self.guarded += guarded
        for stmt in node.body:
            self.visit(stmt)
        self.guarded -= guarded
        for part in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(part)

    def visit_If(self, node):
        guarded = 'hasattr(' in ast.unparse(node.test)
        self.guarded += guarded
        self.generic_visit(node)
        self.guarded -= guarded

    def visit_ClassDef(self, node):
        bases = [self.canonical(b) for b in map(self.resolve, node.bases) if b]
        rclpy_base = next((b for b in bases if b in self.api['classes']), None)
        if rclpy_base is None:
            return self.generic_visit(node)
        own = class_members(node)
        for base in node.bases:  # mixins of this package (e.g. class GroundingNode(InstructionServer, LifecycleNode))
            if isinstance(base, ast.Name) and base.id in self.first_party:
                own |= first_party_members(*self.first_party[base.id])
        self.node_classes.append((rclpy_base, own))
        self.generic_visit(node)
        self.node_classes.pop()

    def visit_Attribute(self, node):
        qualname = self.resolve(node)
        if qualname and qualname.count('.') and not self.exists(qualname):
            self.problem(node, f"{qualname} does not exist")
        elif self.node_classes and isinstance(node.value, ast.Name) and node.value.id == 'self':
            base, own = self.node_classes[-1]
            if node.attr not in own and node.attr not in self.api['classes'][base] \
                    and not isinstance(node.ctx, ast.Store):
                self.problem(node, f"{base}.{node.attr} does not exist")
        self.generic_visit(node)

    def visit_Call(self, node):
        target, params = self.resolve(node.func), None
        if target:
            target = self.canonical(target)
            if target in self.api['functions']:
                params = self.api['functions'][target]
            elif target in self.api['classes']:
                params = self.api['classes'][target].get('__init__')
            else:
                owner, _, method = target.rpartition('.')
                params = self.api['classes'].get(self.canonical(owner), {}).get(method)
        elif self.node_classes and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == 'self':
            params = self.api['classes'][self.node_classes[-1][0]].get(node.func.attr)
            target = f'{self.node_classes[-1][0]}.{node.func.attr}'
        if params is not None and '**' not in params:
            for keyword in node.keywords:
                if keyword.arg is not None and keyword.arg not in params:
                    self.problem(node, f"{target}() has no keyword {keyword.arg!r}")
        self.generic_visit(node)


def rclpy_problems(distro: str, paths) -> list[str]:
    api = json.loads((API / f'{distro}.json').read_text())
    problems = []
    for path in paths:
        checker = RclpyUses(api, path)
        checker.visit(ast.parse(path.read_text(), filename=str(path)))
        problems += checker.problems
    return problems


def package_files() -> list[Path]:
    return sorted(p for s in SOURCES for p in ([s] if s.is_file() else s.rglob('*.py')))


@pytest.mark.parametrize('distro', ['humble', 'jazzy'])
def test_rclpy_api_used_exists_in(distro):
    problems = rclpy_problems(distro, package_files())
    assert not problems, f"not in {distro}'s rclpy (guard with hasattr / try-except, or avoid):\n" + \
        '\n'.join(problems)


def test_api_check_finds_what_humble_lacks(tmp_path):
    """The check can fail: Iron+ parameter callbacks and a Jazzy-only create_timer keyword are reported,
    the same code behind a hasattr guard is not."""
    source = tmp_path / 'node.py'
    source.write_text('import rclpy\nfrom rclpy.node import Node\nfrom rclpy.event_handler import SubscriptionEventCallbacks\n\n\n'
                      'class N(Node):\n'
                      '    def __init__(self):\n'
                      '        super().__init__("n")\n'
                      '        self.add_post_set_parameters_callback(print)\n'
                      '        self.create_timer(1.0, print, autostart=False)\n'
                      '        if hasattr(self, "add_post_set_parameters_callback"):\n'
                      '            self.add_post_set_parameters_callback(print)\n'
                      '        rclpy.init(args=None, context=None)\n')
    humble = rclpy_problems('humble', [source])
    assert len(humble) == 3, humble
    assert any('rclpy.event_handler' in p for p in humble)
    assert any('add_post_set_parameters_callback' in p for p in humble)
    assert any("no keyword 'autostart'" in p for p in humble)
    assert rclpy_problems('jazzy', [source]) == []
