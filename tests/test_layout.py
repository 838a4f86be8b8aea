"""The house's rules on imports, read from the source: no import cycle among the project's modules,
and dependencies that point one way (the trainer and transforms/ never import the pipelines, and
transforms/ never imports the trainer)."""

import ast
import collections

from tests.conftest import REPO

PACKAGES = ('pipelines', 'trainer', 'transforms')


def _modules():
  found = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob('*.py'):
      parts = path.relative_to(REPO).with_suffix('').parts
      name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      found[name] = path
  return found


def _imports(modules):
  """{module: the project's modules it imports} (anywhere in it, function bodies included)."""
  graph = collections.defaultdict(set)
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          target = f'{node.module}.{alias.name}'
          if target in modules:
            graph[name].add(target)
          elif node.module in modules:
            graph[name].add(node.module)
      elif isinstance(node, ast.Import):
        graph[name].update(a.name for a in node.names if a.name in modules)
  return graph


def _cycle(graph, modules):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for target in sorted(graph[module] - {module}):
      if state.get(target) == 'open':
        return path[path.index(target):] + [target]
      if target not in state:
        found = visit(target, path + [target])
        if found:
          return found
    state[module] = 'done'
    return None

  for module in sorted(modules):
    if module not in state:
      found = visit(module, [module])
      if found:
        return found
  return None


def test_no_import_cycle():
  modules = _modules()
  assert len(modules) > 40  # the walk found the packages
  assert _cycle(_imports(modules), modules) is None


def test_dependencies_point_one_way():
  graph = _imports(_modules())
  wrong = sorted((a, b) for a, targets in graph.items() for b in targets
                 if (a.startswith(('trainer', 'transforms')) and b.startswith('pipelines'))
                 or (a.startswith('transforms') and b.startswith('trainer')))
  assert not wrong


def test_the_cycle_finder_finds_cycles():
  graph = collections.defaultdict(set, {'a': {'b'}, 'b': {'c'}, 'c': {'a'}})
  assert _cycle(graph, ['a', 'b', 'c']) == ['a', 'b', 'c', 'a']
