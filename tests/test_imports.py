"""The one-way import rule, read from the source with ast: each file imports only the project's files
below it, so a reader can go through them bottom-up and nothing imports train.py."""
import ast
import glob
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")
# a file may import only files of a lower level; config.py, mmfs.py and world.py know nothing of the project,
# model.py only mmfs.py
LEVELS = {"config": 0, "stats": 0, "mmfs": 0, "model": 0.5, "world": 0, "parser": 0.5, "edits": 0.5, "data": 1, "episodes": 1.5, "generate": 2, "vqascore": 3,
          "evaluate": 3, "interleaved": 3.5, "heads": 4, "rewards": 5, "targeting": 5, "posttrain": 6, "ablations": 7,
          "overopt": 7, "folderpost": 7, "versat2i": 7, "textcraftor": 7, "pretrain": 7, "train": 8, "bench": 8}


def project_imports(path):
    """The project modules a file imports, at any depth (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LEVELS)


def test_every_file_of_the_project_has_a_level():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert files == set(LEVELS), (f"give each new file a level in LEVELS (and the README's import rule): "
                                  f"{files ^ set(LEVELS)}")


def test_imports_flow_one_way():
    for name, level in LEVELS.items():
        for dep in project_imports(os.path.join(ROOT, f"{name}.py")):
            assert LEVELS[dep] < level, f"{name}.py imports {dep}.py, which is not below it"


def test_the_rule_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\ndef f():\n    import train\n    from model import GPT\n")
    assert project_imports(str(bad)) == {"train", "model"}
