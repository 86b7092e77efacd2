"""The documentation cannot drift from the code: config tables, command list, links to functions."""

import importlib.util
import re
from pathlib import Path

import typer

from charlm.cli import app
from charlm.config import describe_fields

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ZH = ROOT / "README.zh-CN.md"
EQUATIONS = ROOT / "docs" / "equations.md"


def config_reference_script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_between_markers(text: str, module) -> str:
    start, end = text.index(module.BEGIN) + len(module.BEGIN), text.index(module.END)
    return text[start:end].strip()


def table_rows(table: str) -> list[list[str]]:
    """Cells of each data row of a markdown table (`\\|` inside a cell kept as |)."""
    rows = []
    for line in table.splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_readme_config_reference_matches_the_code():
    module = config_reference_script()
    readme = README.read_text(encoding="utf-8")
    assert table_between_markers(readme, module) == module.markdown_table(), (
        "README.md's config table is stale: run `python scripts/config_reference.py --write`")


def test_chinese_readme_lists_every_field_with_its_default_and_range():
    module = config_reference_script()
    rows = table_rows(table_between_markers(README_ZH.read_text(encoding="utf-8"), module))
    expected = [[f"`{key}`", f"`{module.format_default(default)}`", rng]
                for key, default, rng, _ in describe_fields()]
    assert [row[:3] for row in rows] == expected, "README.zh-CN.md's config table differs from describe_fields()"
    assert all(row[3] for row in rows), "every field needs its description in Chinese"


def test_readmes_show_every_command():
    commands = typer.main.get_command(app).commands
    for path in (README, README_ZH):
        text = path.read_text(encoding="utf-8")
        missing = [c for c in commands if f"charlm {c}" not in text]
        assert not missing, f"{path.name} does not show {missing}"
        assert "make train" in text and "make test" in text


def test_readmes_name_the_exit_codes():
    for path in (README, README_ZH):
        text = path.read_text(encoding="utf-8")
        for code in ("| 0 |", "| 1 |", "| 2 |", "| 129 |", "| 130 |", "| 143 |"):
            assert code in text, f"{path.name} lacks exit code {code}"


def test_links_to_functions_point_at_their_definitions():
    """`[name](../charlm/file.py#L12)` must land on the line that defines `name`."""
    for doc in (EQUATIONS, README, README_ZH):
        for name, target, line in re.findall(r"\[`?([\w.]+)`?\]\(([^)#]+\.py)#L(\d+)\)", doc.read_text(encoding="utf-8")):
            source = (doc.parent / target).resolve()
            assert source.is_file(), f"{doc.name}: {target} does not exist"
            lines = source.read_text(encoding="utf-8").splitlines()
            short = name.split(".")[-1]
            found = [i + 1 for i, text in enumerate(lines) if re.match(rf"\s*(def|class) {short}\b", text)]
            assert int(line) in found, (f"{doc.name}: {name} links to {target}#L{line}, "
                                        f"but it is defined at line(s) {found}: run scripts/update_doc_links.py")


def test_relative_links_in_docs_exist():
    for doc in (README, README_ZH, EQUATIONS):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def _module_order(text: str) -> dict[str, int]:
    """Module name -> line of the READMEs' "Where things live" list that names it."""
    block = text[text.index("\ncharlm/\n"):]
    block = block[: block.index("```")]
    order = {}
    for index, line in enumerate(block.splitlines()):
        names = re.match(r"  ((?:[a-z_]+\.(?:py|c) ?)+)", line)
        for name in (names.group(1).split() if names else []):
            if name.endswith(".py"):
                order[name.removesuffix(".py")] = index
    return order


def test_modules_import_only_those_above_them_in_the_readmes_list():
    for readme in (README, README_ZH):
        order = _module_order(readme.read_text(encoding="utf-8"))
        listed = {p.stem for p in (ROOT / "charlm").glob("*.py")} - {"__init__", "__main__"}
        assert set(order) == listed, readme.name
        for module, line in order.items():
            source = (ROOT / "charlm" / f"{module}.py").read_text(encoding="utf-8")
            imported = re.findall(r"^from \.([a-z_]+) import", source, re.M)
            imported += [n.strip() for group in re.findall(r"^from \. import ([a-z_, ]+)", source, re.M)
                         for n in group.split(",")]
            late = [name for name in imported if order.get(name, -1) > line]
            assert not late, f"{readme.name}: {module}.py imports {late}, listed below it"


def test_reliability_page_names_each_test_with_the_file_that_holds_it():
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = re.findall(r"`((?:test_\w+\.py::)?)(test_\w+)`", text)
    assert len(named) > 50  # the page's tables were read
    for file, name in named:
        assert file, f"docs/reliability.md: give the file of {name} (test_x.py::{name})"
        source = (ROOT / "tests" / file[:-2]).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/reliability.md: {file}{name} does not exist"


def test_multi_process_examples_divide_the_configs_batch():
    """Every `--nproc N` or torchrun command in the docs with a shipped config must be one that train accepts:
    its train.batch_size a multiple of the processes (the two-machine example once asked for 8 with 20)."""
    from charlm.config import load_config
    commands = []
    for doc in (README, README_ZH, ROOT / "docs" / "scaling.md"):
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        commands += [line for line in text.splitlines() if "--config configs/" in line
                     and ("--nproc " in line or "torchrun " in line)]
    assert len(commands) >= 5
    for line in commands:
        nproc = re.search(r"--nproc (\d+)", line)
        per_node = re.search(r"--nproc_per_node (\d+)", line)
        nodes = re.search(r"--nnodes (\d+)", line)
        processes = int(nproc.group(1)) if nproc else int(per_node.group(1)) * int(nodes.group(1) if nodes else 1)
        config = re.search(r"--config (configs/\S+)", line).group(1)
        batch = load_config(ROOT / config).train.batch_size
        assert batch % processes == 0, f"{line.strip()}: {config}'s batch_size {batch} is not a multiple of {processes}"
