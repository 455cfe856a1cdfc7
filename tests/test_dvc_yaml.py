"""dvc.yaml declares, for every stage, exactly the code it runs.

The product's promise is that changing code or a parameter reruns only the stages it affects.
That holds only if each stage lists its script and every drsft module the script imports,
directly or transitively — checked here by parsing the imports.
"""

import ast
from pathlib import Path

import yaml

from pipeline_copy import stages_of

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _drsft_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drsft":
            mods.add(node.module)
            for alias in node.names:  # `from drsft import rewrite`, `from drsft.toy import world`
                folder = SRC.joinpath(*node.module.split("."))
                if (folder / f"{alias.name}.py").exists() or (folder / alias.name / "__init__.py").exists():
                    mods.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names if a.name.split(".")[0] == "drsft")
    return mods


def _module_file(mod: str) -> Path:
    parts = mod.split(".")
    f = SRC.joinpath(*parts).with_suffix(".py")
    return f if f.exists() else SRC.joinpath(*parts, "__init__.py")


def transitive_code(script: Path) -> set[str]:
    todo, seen = [script], set()
    while todo:
        f = todo.pop()
        mods = _drsft_imports(f)
        # importing drsft.a.b runs the package drsft.a's __init__ first
        mods |= {".".join(m.split(".")[:k]) for m in mods for k in range(2, m.count(".") + 1)}
        for mod in mods:
            mf = _module_file(mod)
            rel = mf.relative_to(ROOT).as_posix()
            if rel not in seen:
                seen.add(rel)
                todo.append(mf)
    # the package's own __init__ (version, environment check) changes no stage's output
    seen.discard("src/drsft/__init__.py")
    return seen


def _stages():
    return stages_of(ROOT)


def _dep_paths(stage):
    return {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}


def test_every_stage_lists_its_script_and_all_imported_modules():
    problems = []
    for name, stage in _stages().items():
        script = next(w for w in stage["cmd"].split() if w.startswith("stages/"))
        # the code DVC hashed is the code that runs: the run folder's src/, not an installed copy
        assert stage["cmd"].startswith("PYTHONPATH=src "), f"stage {name}: {stage['cmd']}"
        deps = _dep_paths(stage)
        assert script in deps, f"stage {name}: its script {script} is not a dep"
        code_deps = {d for d in deps if d.startswith("src/")}
        needed = transitive_code(ROOT / script)
        if needed - code_deps:
            problems.append(f"{name}: missing deps {sorted(needed - code_deps)}")
        if code_deps - needed:
            problems.append(f"{name}: declares code it does not import {sorted(code_deps - needed)}")
    assert not problems, "\n".join(problems)


def test_every_stage_declares_params_and_outputs():
    for name, stage in _stages().items():
        assert stage.get("params"), f"stage {name} declares no params"
        assert stage.get("outs") or stage.get("metrics"), f"stage {name} declares no outputs"
        assert any(Path(next(iter(m)) if isinstance(m, dict) else m).parts[0] == "metrics"
                   for m in stage.get("metrics", [])), f"stage {name} writes no metrics/*.json"


def test_declared_params_exist_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _stages().items():
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: param {key} not in params.yaml"
                node = node[part]


def test_prepare_depends_on_the_inputs_folder():
    """Real-scale input files are versioned: prepare declares ``prepare.files.root`` as a dep, and
    the default root is a folder that exists in a fresh clone (git-tracked, empty of data)."""
    import subprocess

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    assert "${prepare.files.root}" in _dep_paths(stage)
    root = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]["files"]["root"]
    tracked = subprocess.run(["git", "ls-files", root], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"{root}/README.md" in tracked.split()


def test_prepare_params_are_every_prepare_key_but_the_probe():
    """prepare reruns (minutes of pretraining) on any prepare key except ``prepare.probe``, whose
    stage is ``probe``; a new prepare key must be declared here or it would not rerun prepare."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = _stages()
    declared = {k.split(".", 1)[1] for k in stages["prepare"]["params"] if k.startswith("prepare.")}
    assert declared == set(params["prepare"]) - {"probe"}
    assert "prepare.probe" in stages["probe"]["params"]


def test_editing_sampler_or_verifier_code_does_not_rerun_pretraining():
    deps = _dep_paths(_stages()["prepare"])
    assert not [d for d in deps if d.startswith("src/drsft/rollout/")], deps
    assert not deps & {"src/drsft/shards.py", "src/drsft/toy/probe.py", "src/drsft/scoring.py",
                       "src/drsft/evaluate.py"}, deps
    assert "src/drsft/rollout/hf.py" in _dep_paths(_stages()["probe"])   # the probe stage has them


def test_a_stage_run_without_the_environment_says_how_to_run_it():
    """A stage under an interpreter without the project's packages (``-S``: no site-packages, as
    the system python that `.venv/bin/dvc` runs when the venv is not activated) ends with one line
    naming what is missing and how to run it, not a traceback; every stage imports drsft first."""
    import os
    import subprocess
    import sys

    for script in sorted((ROOT / "stages").glob("*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        def top(n):
            return (n.names[0].name if isinstance(n, ast.Import) else n.module).split(".")[0]

        first = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                     and top(n) not in sys.stdlib_module_names and top(n) != "__future__")
        assert isinstance(first, ast.Import) and first.names[0].name == "drsft", f"{script.name}: imports drsft first"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-S", "stages/verify.py", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "click" in proc.stderr and "torch" in proc.stderr and "source .venv/bin/activate" in proc.stderr


def test_the_trained_model_is_a_registered_artifact():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    art = doc["artifacts"]["trained-model"]
    assert art["type"] == "model" and art["path"] in {o if isinstance(o, str) else next(iter(o))
                                                     for o in _stages()["train"]["outs"]}
