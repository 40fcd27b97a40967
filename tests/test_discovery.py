"""Trainer discovery through nnUNet_extTrainer: installed and editable layouts, pickling, names, imports."""
import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nnunetv2
import nnunet_cl_trainers
from nnunet_cl.ext_path import ext_trainer_path

REPO = Path(__file__).resolve().parents[1]
OUR_TRAINERS = sorted(n for n, o in vars(nnunet_cl_trainers).items()
                      if inspect.isclass(o) and n.startswith("nnUNetTrainer"))

LOOKUP = """
import os, pickle, sys
if os.environ.get("DROP_EDITABLE_FINDER"):  # the dev machine's editable install must not shadow the target
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
cls = recursive_find_trainer_class_by_name("nnUNetTrainerSimCLR")
assert cls.__module__ == "nnunet_cl_trainers.simclr", cls.__module__
assert pickle.loads(pickle.dumps(cls)) is cls   # what spawn-started augmentation workers need
import nnunet_cl_trainers.pool_data as pd
assert pickle.loads(pickle.dumps(pd.TwoViewDataLoader)) is pd.TwoViewDataLoader
print(sys.modules["nnunet_cl_trainers"].__file__)
"""


def _lookup(env):
    return subprocess.run([sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=300)


def test_ext_path_is_the_shim_folder():
    path = Path(ext_trainer_path())
    assert path.name == "ext" and (path / "nnunet_cl_trainers_ext.py").is_file()
    assert list(path.glob("*.py")) == [path / "nnunet_cl_trainers_ext.py"]  # nnU-Net imports every module here


def test_lookup_in_this_install():
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_path()}
    proc = _lookup(env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lookup_from_a_regular_non_editable_install(tmp_path):
    """pip install (not -e) into a fresh target: the printed path works from there too."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                           "--target", str(target), str(REPO)], capture_output=True, text=True,
                               encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "DROP_EDITABLE_FINDER": "1"}
    printed = subprocess.run([sys.executable, "-c", LOOKUP.split("from nnunetv2")[0] +
                              "from nnunet_cl.ext_path import ext_trainer_path as p; print(p())"],
                             env=env, capture_output=True, text=True, encoding="utf-8", errors="replace").stdout.strip()
    assert printed == str(target / "nnunet_cl_trainers" / "ext")
    proc = _lookup({**env, "nnUNet_extTrainer": printed})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(str(target))


def test_without_the_variable_nnunet_cannot_find_our_trainers():
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    proc = _lookup(env)
    assert proc.returncode != 0 and "Could not find requested nnunet trainer" in proc.stderr


@pytest.mark.parametrize("name", OUR_TRAINERS)
def test_no_name_clash_with_nnunet(name):
    """nnU-Net's own tree is searched first: a clash would silently run nnU-Net's class instead of ours."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                        "nnunetv2.training.nnUNetTrainer", nnunetv2.__path__[0])
    assert found is None


# the standard library and the core dependencies nnU-Net itself needs
ALLOWED_TOP_LEVEL = set(sys.stdlib_module_names) | {
    "torch", "numpy", "nnunetv2", "nnunet_cl", "nnunet_cl_trainers", "batchgenerators", "acvl_utils",
    "threadpoolctl",
    "batchgeneratorsv2"}  # nnunetv2 2.8 requires it (its training transforms); SuperCL's loader sets its SpatialTransform


@pytest.mark.parametrize("module", sorted(p for p in (REPO / "trainers").rglob("*.py")), ids=lambda p: p.name)
def test_trainers_import_no_optional_dependency_at_module_level(module):
    """One failing import breaks nnU-Net's whole trainer lookup, so module level imports only core packages."""
    tree = ast.parse(module.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in ALLOWED_TOP_LEVEL, f"{module.name} imports {name} at module level"


def test_trainers_import_with_optional_extras_missing():
    """The library modules the trainers import stay free of optional extras too."""
    blocked = "import sys\nfor m in ('segment_anything', 'sam2', 'lightly', 'pytorch_metric_learning'):" \
              "\n    sys.modules[m] = None\nimport nnunet_cl_trainers\n"
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, in its code and in code it hands to `python -c` as a string."""
    def walk(source: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
                try:
                    found |= walk(node.value)
                except SyntaxError:  # prose that mentions "import", not code
                    pass
        return found
    return walk(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted((REPO / "nnunet_cl").rglob("*.py")), ids=lambda p: p.name)
def test_library_never_imports_trainers(path):
    """Dependencies flow one way: trainers/ uses nnunet_cl/, and nnunet_cl/ knows nothing of any trainer.

    One exception, by name: the benchmark checks that its schedules exist with nnU-Net's own trainer lookup (as
    nnUNetv2_train does), in a subprocess; that lookup imports every trainer module, so nothing else may use it."""
    lookup = "nnunetv2.utilities.find_objects"
    bad = {m for m in _imported_modules(path)
           if m.startswith(("nnunet_cl_trainers", "nnunetv2.training.nnUNetTrainer"))
           or (m.startswith(lookup) and path.relative_to(REPO).as_posix() != "nnunet_cl/bench/runner.py")}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_layering_check_sees_imports_in_code_strings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('code = "import json\\nfrom nnunet_cl_trainers.benchmark import X\\n"\n')
    assert "nnunet_cl_trainers.benchmark" in _imported_modules(probe)


def test_ext_trainer_path_without_the_package_fails_loudly():
    """Not installed: a message with the fix on stderr and a non-zero exit, so `export ...=$(...)` shows it."""
    code = ("import importlib.util\n"
            "importlib.util.find_spec = lambda *a, **k: None  # as if nnunet_cl_trainers were not installed\n"
            "from nnunet_cl.ext_path import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "nnUNetv2_cl_ext_trainer_path: error: nnunet_cl_trainers is not installed. Fix: pip install" in proc.stderr


def test_every_console_command_answers_help(monkeypatch, capsys):
    """Each console script of the package prints its usage and exits with 0, as the script would be called
    (`sys.argv`, in this process)."""
    from importlib.metadata import distribution
    commands = [ep for ep in distribution("nnunet-cl").entry_points if ep.group == "console_scripts"]
    assert len(commands) >= 13
    for ep in commands:
        main = ep.load()
        monkeypatch.setattr(sys, "argv", [ep.name, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code in (0, None), ep.name
        assert "usage:" in capsys.readouterr().out.lower(), ep.name
