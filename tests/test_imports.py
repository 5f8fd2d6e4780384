"""Every onthefly module imports alone, in a process where no other onthefly module is loaded:
an import circle fails there whichever module of the circle comes first.

The test process has the third-party libraries loaded already (torch and the rest take seconds
to import); it forks a child per module, and each child forgets every module of the package
and imports just that one. So every module gets the fresh start a `python -c "import
onthefly.X"` would give, at the cost of a fork."""

import importlib
import os
import pkgutil
import sys
import traceback

import onthefly


def modules_failing_alone(package: str) -> list[str]:
    """The modules of `package` that fail to import in a process holding none of its modules."""
    root = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.walk_packages(root.__path__, f"{package}."))
    for name in names:  # load the third-party libraries here once, not in every child
        try:
            importlib.import_module(name)
        except Exception:  # reported by its child below
            pass
    failures, running = [], {}

    def reap() -> None:
        pid, status = os.wait()
        if status:
            failures.append(running[pid])
        del running[pid]

    for name in names:
        if len(running) >= 2:
            reap()
        pid = os.fork()
        if pid == 0:  # the child: nothing of the package loaded, then one module
            code = 1
            try:
                for loaded in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
                    del sys.modules[loaded]
                importlib.import_module(name)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        running[pid] = name
    while running:
        reap()
    return sorted(failures)


def test_every_module_imports_alone():
    assert modules_failing_alone(onthefly.__name__) == []


def test_the_check_finds_an_import_circle(tmp_path, monkeypatch):
    """Two modules that import each other: a plain loop over them would pass once the first loaded."""
    package = tmp_path / "circle_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\nA = 1\n")
    (package / "b.py").write_text("from .a import A\nB = 2\n")
    (package / "c.py").write_text("C = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert modules_failing_alone("circle_pkg") == ["circle_pkg.a", "circle_pkg.b"]
