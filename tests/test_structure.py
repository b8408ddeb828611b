"""How the package holds together, read from its source: short functions, no import circle, and the whole
configuration only in the doors and the builder (each component gets its own section or plain values)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskcon"
# the doors (cli, launcher), the configuration's own module, the plan and the builder
WHOLE_CONFIG_MODULES = {"maskcon.cli", "maskcon.launcher", "maskcon.config", "maskcon.plan", "maskcon.run"}
WHOLE_CONFIG_FUNCTIONS = {("maskcon.train", "train")}   # the trainer's entry: builds the run, then loops


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def functions(tree: ast.Module):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_80_lines():
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in modules().items() for node in functions(tree)
            if node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def test_only_the_doors_and_the_builder_take_the_whole_configuration():
    takers = []
    for name, tree in modules().items():
        for node in functions(tree):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            typed = [a.arg for a in arguments if a.annotation is not None and "Config" in ast.unparse(a.annotation)
                     and ast.unparse(a.annotation) != "dict"]
            if typed and name not in WHOLE_CONFIG_MODULES and (name, node.name) not in WHOLE_CONFIG_FUNCTIONS:
                takers.append(f"{name}.{node.name}({', '.join(typed)})")
    assert takers == []


def test_the_loop_gets_its_section_not_the_configuration():
    from maskcon.config import Config
    from maskcon.run import LoopSettings, Run

    assert all(field.type not in (Config, "Config") for field in Run.__dataclass_fields__.values())
    assert set(LoopSettings.__dataclass_fields__) < set(Config.__dataclass_fields__)


def test_no_import_circle_at_module_level():
    trees = modules()
    graph = {name: set() for name in trees}
    for name, tree in trees.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        package = name if is_package else name.rpartition(".")[0]
        for node in tree.body:   # imports inside functions are deliberate late imports
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in trees else base for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in trees and target != name}

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    return path + [start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    circles = [" -> ".join(found) for name in graph if (found := circle_from(name))]
    assert circles == []
