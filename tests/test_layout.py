"""The house rules a test can check: no import circle among the modules (not even through an
import inside a function), no script importing another script, train() short enough to read in
one sitting, and every mutant of tests/mutants.py still plantable in the code it names (and never
counted killed by a test id that names nothing)."""

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in REPO.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The repo's modules that path imports, wherever in the file the import is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return (names & MODULES.keys()) - {path.stem}


def is_script(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def test_no_module_imports_itself_through_others():
    graph = {name: imports_of(path) for name, path in MODULES.items()}

    def circle_from(start, name, trail):
        for imported in graph[name]:
            if imported == start:
                return trail + [imported]
            if imported not in trail:
                if found := circle_from(start, imported, trail + [imported]):
                    return found
        return None

    circles = [found for name in graph if (found := circle_from(name, name, [name]))]
    assert not circles, f"import circles: {circles}"


def test_no_script_imports_a_script():
    scripts = {name for name, path in MODULES.items() if is_script(path)}
    assert {"launch", "sample", "eval", "bench", "export"} <= scripts
    offenders = {name: imports_of(MODULES[name]) & scripts for name in MODULES}
    assert not {name: found for name, found in offenders.items() if found}


def test_train_reads_in_one_sitting():
    # the loop's four marked sections, with the start's notes and lines as small functions
    import train

    source = inspect.getsource(train.train)
    assert len(source.splitlines()) < 165, len(source.splitlines())
    for section in ("# step:", "# log:", "# evaluate and save:", "# stop:"):
        assert section in source, section


def test_every_mutant_of_tests_mutants_py_can_still_be_planted():
    # a snippet the code no longer holds plants nothing: its mutant would quietly stop being run
    import mutants

    for name, file, snippet, mutated, covering in mutants.MUTANTS:
        count = (REPO / file).read_text().count(snippet)
        assert count == 1, f"{name}: its snippet occurs {count} times in {file}"
        assert mutated != snippet, name
        assert all((REPO / path).exists() for path in covering), name


def test_a_mutant_checked_against_a_test_id_that_names_nothing_is_no_kill():
    # pytest exits non-zero when it collects nothing: counted as a failure, a typo killed every mutant
    import mutants

    with pytest.raises(SystemExit, match="pytest ran no test of tests/test_layout.py::no_such_test"):
        mutants.pytest(REPO, ["tests/test_layout.py::no_such_test"])


def test_a_run_of_some_mutants_leaves_tests_mutants_md_as_it_was(monkeypatch, tmp_path):
    # one mutant checked against one test once overwrote the last full pass's table with its row
    import mutants

    monkeypatch.setattr(mutants, "RESULTS", tmp_path / "mutants.md")
    mutants.RESULTS.write_text("the last full pass")
    monkeypatch.setattr(mutants, "run_mutant", lambda name, *mutant, tests: {
        "name": name, "result": "killed", "by": "a test"})
    mutants.main(["--only", "model.loss_counts_ignored", "--tests", "tests/test_model.py"])
    mutants.main(["--only", "model.loss_counts_ignored"])
    assert mutants.RESULTS.read_text() == "the last full pass"
    mutants.main(["--only", "model.loss_counts_ignored", "--out", str(tmp_path / "some.md")])
    assert "| model.loss_counts_ignored | killed | a test |" in (tmp_path / "some.md").read_text()
    mutants.main([])  # every mutant: the table is the last full pass
    assert mutants.RESULTS.read_text().count("| killed | a test |") == len(mutants.MUTANTS)
