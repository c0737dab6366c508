"""The shape of the package: no import loops, a light config, one home per method and reward, a
README layout that matches the tree, and documentation whose links resolve."""

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT

PKG = ROOT / "rayreward"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the rayreward modules it imports}, from the source (imports inside functions too).
    `from rayreward.x import y` counts as importing rayreward.x.y when that is a module, else
    rayreward.x; a package's __init__ is imported with any of its modules, as Python does."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t.startswith("rayreward"):
                    deps.add(t)
                    parent = t.rpartition(".")[0]
                    while parent.startswith("rayreward."):  # importing a.b.c runs a.b's __init__ first
                        deps.add(parent)
                        parent = parent.rpartition(".")[0]
        deps.discard(name)
        deps.discard("rayreward")  # the top package's __init__ is empty
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # a module's own package is loaded already
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_loops():
    graph = import_graph()
    assert "rayreward.rewards.clip" in graph and "rayreward.methods" in graph["rayreward.config"]
    assert cycles(graph) == []


def test_the_loop_finder_finds_a_planted_loop():
    graph = import_graph()
    graph["rayreward.methods"] = graph["rayreward.methods"] | {"rayreward.config"}  # config -> methods -> config
    loops = cycles(graph)  # the loop is reported from whichever of its modules the search met first
    assert any(len(c) == 3 and set(c) == {"rayreward.config", "rayreward.methods"} for c in loops), loops


def test_validating_a_config_and_parsing_the_command_line_import_no_torch():
    code = textwrap.dedent("""
        import sys
        from rayreward import cli, config
        cfg = config.from_dict({"rewards": [{"name": "pickscore"}, {"name": "helpers:mean_red"}]}, ["method.name=alignprop"])
        cli.build_parser().parse_args(["sample", "--lora", "a=x:0.5", "--seeds", "0", "1"])
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "ray") if m in sys.modules)
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})


def test_a_new_method_is_one_entry_in_methods_py():
    """What a contributor writes for a seventh method (one Method and its parameter, in
    methods.py) is enough for the config, its validation and the sampler's plan."""
    code = textwrap.dedent("""
        from rayreward import methods
        methods.PARAMS["every_other"] = methods.Param(int, 2, "demo: train every n-th step")
        methods.METHODS["demo"] = methods.Method(
            "demo", "every n-th step carries gradient", ("every_other",),
            lambda m, T, g, gens: methods.StepPlan(T, frozenset(range(1, T + 1, m.every_other))),
            lambda m, T: [] if m.every_other >= 1 else [f"method.every_other: {m.every_other} is not allowed"])
        from rayreward import config
        cfg = config.from_dict({"method": {"name": "demo", "every_other": 3}}, ["sampling.num_steps=7"])
        assert "demo" in config.METHODS
        assert methods.make_plan(cfg.method, 7, batch=2).grad_steps == {1, 4, 7}
        try:
            config.from_dict({"method": {"name": "demo", "every_other": 0}})
        except config.ConfigError as e:
            assert e.problems == ["method.every_other: 0 is not allowed"], e.problems
        else:
            raise AssertionError("the new method's rule did not run")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_every_registered_reward_resolves_to_its_factory():
    from rayreward import rewards

    for name, target in rewards.REGISTRY.items():
        factory = rewards.factory_of(name)
        assert callable(factory) and f"{factory.__module__}:{factory.__name__}" == target


def test_the_readme_layout_lists_every_module():
    """Each file of the package appears in the README's Layout section, and nothing else does."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^(rayreward/\S+\.py)", layout, flags=re.M))
    files = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG}
    assert listed == files, (sorted(files - listed), sorted(listed - files))


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_links(page: Path) -> list[tuple[str, Path]]:
    """(the link as written, the file it points at) for each relative link of a Markdown page."""
    out = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        out.append((target, (page.parent / target.split("#", 1)[0]).resolve()))
    return out


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [f"{p.relative_to(ROOT)}: {t}" for p in pages for t, f in doc_links(p) if not f.exists()]
    assert broken == []


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [(ROOT / "README.md").resolve()]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.is_file():
            continue
        seen.add(page)
        todo += [f for _, f in doc_links(page)]
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - seen) == []


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md#x) [web](https://example.org) [here](#top)")
    assert [(t, f.exists()) for t, f in doc_links(page)] == [("page.md", True), ("nowhere.md#x", False)]


def test_the_readme_stays_short_and_carries_no_suite_figures():
    """A newcomer reads it in minutes; figures that change with every commit stay out of it."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert not re.search(r"\d+ passed|\d+ min \d+ s", readme)
