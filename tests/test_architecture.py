"""The package's shape: an import graph without cycles, private APIs in one module."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "convnext_zoo"


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lazy_names():
    """The package's lazily imported public names: `{name: module}` (its `_LAZY` table)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_LAZY":
            return ast.literal_eval(node.value)
    raise AssertionError("convnext_zoo/__init__.py has no _LAZY table")


def import_graph():
    """`{module: {imported package modules}}` from the source, function-local imports included.

    `convnext_zoo.from_preset` and the other lazily imported public names
    count as an import of the module that defines them.
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    lazy = _lazy_names()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "convnext_zoo" and node.attr in lazy):
                targets = [lazy[node.attr]]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from convnext_zoo import x` imports the module x when it is one.
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or `None`."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # The package's own __init__ re-exports lazily (by string), so it adds no edge.
    graph["convnext_zoo"] = set()
    assert len(graph) > 20 and graph["convnext_zoo.pipeline"], graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_lazy_public_names_count_as_imports():
    graph = import_graph()
    assert "convnext_zoo.factory" in graph["convnext_zoo.deploy"]  # convnext_zoo.from_preset(...)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["convnext_zoo"] = set()
    # The loader reaching back up to the model classes would close a loop.
    graph["convnext_zoo.build"] = graph["convnext_zoo.build"] | {"convnext_zoo.backbone"}
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "convnext_zoo.build" in cycle


def test_loading_flows_down_from_the_model_classes():
    graph = import_graph()
    for lower in ("convnext_zoo.pipeline", "convnext_zoo.build", "convnext_zoo.readers",
                  "convnext_zoo.resolve", "convnext_zoo.weights"):
        assert not graph[lower] & {"convnext_zoo.backbone", "convnext_zoo.classifier",
                                   "convnext_zoo.factory"}, lower
    assert "convnext_zoo.pipeline" in graph["convnext_zoo.backbone"]


PRIVATE = ("keras.src", "keras_hub.src", "tensorflow.python", "_create_op_internal",
           "_deferred_initialize", "._initializer", "._value")


@pytest.mark.parametrize(
    "path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "internals.py"), ids=lambda p: p.name
)
def test_private_apis_appear_only_in_internals(path):
    text = path.read_text()
    assert not [p for p in PRIVATE if p in text], path


def test_backbone_holds_architecture_only():
    text = (PACKAGE / "backbone.py").read_text()
    for loading in ("safetensors", "load_value", "dlpack", "aligned", "assign_strict", "readers"):
        assert loading not in text.lower(), loading
