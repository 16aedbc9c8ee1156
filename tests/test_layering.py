"""The package's import graph: layers point down, no circles, no size creep.

Read from the source with `ast` (nothing is imported), so a circle held open by an
import inside a function is seen as well as one at the top of a module.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'flaxbert_cls'

# Lower layers first; a module may import its own folder and any layer below its own.
LAYERS = (
    ('errors',),
    ('workdir',),
    ('data',),
    ('model',),
    ('decisions',),
    ('config',),
    ('saved_config', 'config_reference'),  # read or render the config
    ('tracking',),  # writers the loop feeds: below it
    ('training',),
    ('plan',),  # compiles training's programs for a topology
    ('report',),
    ('serving',),
    ('cli',),
)
MAX_LINES = 400
# The limit is a prompt to look, not a reason to split a job in two: a module whose one job
# needs more is named here with its own limit and why.
LONG_MODULES = {
    'flaxbert_cls.config': (480, 'the schema: every key with its default and why, the checks '
                            'of them and what they resolve to (RunPlan)'),
    'flaxbert_cls.model.hf': (420, 'every Hugging Face name and file in one place: families, the '
                              'name map both ways, safetensors (sharded, lazy), the configs of '
                              'our own exports, the tokenizer'),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[str, bool]]:
  """(imported package module, imported inside a function) for each import of the package."""
  tree = ast.parse(path.read_text(), filename=str(path))
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function.update(id(child) for child in ast.walk(node) if child is not node)
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from flaxbert_cls.data import tasks` imports the module data.tasks.
      names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
               else node.module for alias in node.names]
    for name in names:
      if name.split('.')[0] == 'flaxbert_cls' and name in modules and name != 'flaxbert_cls':
        found.append((name, id(node) in in_function))
  return found


def _layer(module: str) -> int:
  top = module.split('.')[1] if '.' in module else ''
  for rank, names in enumerate(LAYERS):
    if top in names:
      return rank
  raise AssertionError(f'{module} is in no layer of tests/test_layering.py LAYERS')


def _graph() -> dict[str, list[tuple[str, bool]]]:
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def test_imports_point_down_only():
  wrong = []
  for module, imports in _graph().items():
    if module == 'flaxbert_cls':
      continue
    own_folder = module.rsplit('.', 1)[0]
    for imported, _ in imports:
      same_folder = imported.rsplit('.', 1)[0] == own_folder and own_folder != 'flaxbert_cls'
      if not same_folder and _layer(imported) >= _layer(module):
        wrong.append(f'{module} imports {imported}')
  assert not wrong, 'imports pointing up or sideways:\n' + '\n'.join(wrong)


def test_no_package_import_inside_a_function():
  """An import inside a function is how circles hide; only the CLI may defer one."""
  hidden = [f'{module} imports {imported} inside a function'
            for module, imports in _graph().items() if module != 'flaxbert_cls.cli'
            for imported, in_function in imports if in_function]
  assert not hidden, '\n'.join(hidden)


def test_no_test_imports_a_benchmark_or_tool():
  """Tests check the package (and run the commands as a user does), never a script's insides:
  benchmarks/ and tools/ change with what they measure."""
  scripts = {p.stem for folder in ('benchmarks', 'tools')
             for p in (PACKAGE.parent / folder).glob('*.py')}
  found = []
  for test in sorted((PACKAGE.parent / 'tests').glob('*.py')):
    tree = ast.parse(test.read_text())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      found += [f'{test.name} imports {n}' for n in names if n.split('.')[0] in scripts]
      call = ast.unparse(node) if isinstance(node, ast.Call) else ''
      if (call.startswith(('sys.path.insert', 'importlib.util.spec_from_file_location'))
          and any(f"'{folder}'" in call or f'{folder}/' in call
                  for folder in ('benchmarks', 'tools'))):
        found.append(f'{test.name}: {call[:100]}')
  assert not found, '\n'.join(found)


def test_no_import_circles():
  graph = {m: sorted({i for i, _ in imports}) for m, imports in _graph().items()}
  circles = []
  state: dict[str, str] = {}
  stack: list[str] = []

  def visit(module: str) -> None:
    state[module] = 'open'
    stack.append(module)
    for imported in graph[module]:
      if state.get(imported) == 'open':
        circles.append(' -> '.join(stack[stack.index(imported):] + [imported]))
      elif imported not in state:
        visit(imported)
    stack.pop()
    state[module] = 'done'

  for module in graph:
    if module not in state:
      visit(module)
  assert not circles, 'import circles:\n' + '\n'.join(circles)


@pytest.mark.parametrize('module', sorted(_modules()))
def test_module_size(module):
  lines = len(_modules()[module].read_text().splitlines())
  limit = LONG_MODULES.get(module, (MAX_LINES,))[0]
  assert lines <= limit, f'{module}: {lines} lines > {limit}; is it still one job?'


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
  """Lower layers first, each in its own import: a circle would fail on its first member."""
  order = sorted(_modules(), key=lambda m: (_layer(m) if m != 'flaxbert_cls' else -1, m))
  script = 'import importlib\nfor name in %r:\n  importlib.import_module(name)\n' % order
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
