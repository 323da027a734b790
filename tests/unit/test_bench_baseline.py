"""bench --baseline: resolving and exporting a commit, its build, where its code is imported from.

The git tests use a throwaway repository; the processes started here are git, tar and short Python
runs (the build stand-in and an import probe), no server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench.baseline as baseline_mod
from bench.baseline import (
    RunningCode,
    baseline_env,
    build_tree,
    check_code,
    export_tree,
    prepared_baseline,
    resolve_commit,
    uvgate_modules,
    worktree_label,
)
from devstack import StackError
from devstack.procfs import mapped_files

SO = "cpython-311-x86_64-linux-gnu.so"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with two commits; proxy/version.txt says which."""
    root = tmp_path / "repo"
    (root / "proxy").mkdir(parents=True)
    _git(root, "init", "-q")
    for n in (1, 2):
        (root / "proxy" / "version.txt").write_text(f"{n}\n")
        (root / "setup.py").write_text("print('built')\n")
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", f"commit {n}")
    return root


# ---------------------------------------------------------------------------------------------- git


def test_resolve_commit(repo: Path) -> None:
    head, parent = _git(repo, "rev-parse", "HEAD"), _git(repo, "rev-parse", "HEAD~1")
    commit = resolve_commit("HEAD~1", repo)
    assert (commit.ref, commit.sha) == ("HEAD~1", parent)
    assert parent.startswith(commit.short) and 7 <= len(commit.short) < 40
    assert resolve_commit(head[:10], repo).sha == head
    for bad in ("nosuchref", "--all", "HEAD~5"):
        with pytest.raises(StackError, match="no such commit"):
            resolve_commit(bad, repo)


def test_export_tree_writes_the_commits_files_only(repo: Path, tmp_path: Path) -> None:
    (repo / "proxy" / "version.txt").write_text("uncommitted\n")
    (repo / "untracked.txt").write_text("x\n")
    dest = tmp_path / "out" / "baseline"
    export_tree(resolve_commit("HEAD~1", repo), dest, repo)
    assert (dest / "proxy" / "version.txt").read_text() == "1\n"
    assert sorted(p.name for p in dest.iterdir()) == ["proxy", "setup.py"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["baseline"], "the archive is removed"
    assert _git(repo, "worktree", "list").count("\n") == 0, "no worktree added"


def test_worktree_label(repo: Path, tmp_path: Path) -> None:
    short = _git(repo, "rev-parse", "--short", "HEAD")
    assert worktree_label(repo) == f"working tree at {short}"
    (repo / "notes.txt").write_text("x\n")
    _git(repo, "add", "notes.txt")
    assert worktree_label(repo) == f"working tree at {short}", "only the proxy's files count"
    (repo / "proxy" / "version.txt").write_text("3\n")
    assert worktree_label(repo) == f"working tree at {short} + uncommitted changes to the proxy"
    assert worktree_label(tmp_path / "nowhere") == "working tree (not a git checkout)"


# ---------------------------------------------------------------------------------------------- build


def test_build_tree_runs_setup_py_with_the_tree_first(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "setup.py").write_text(
        "import os, sys\n"
        "assert sys.argv[1:] == ['-q', 'build_ext', '--inplace'], sys.argv\n"
        "print('PYTHONPATH=' + os.environ['PYTHONPATH'], 'cwd=' + os.getcwd())\n"
    )
    log = tmp_path / "build.log"
    seconds = build_tree(tree, python=sys.executable, env={**os.environ, "PYTHONPATH": "/elsewhere"}, log_path=log)
    assert seconds > 0
    assert f"PYTHONPATH={tree} cwd={tree}" in log.read_text()


def test_build_failure_names_the_log(tmp_path: Path) -> None:
    (tmp_path / "setup.py").write_text("import sys\nprint('mypyc said no')\nsys.exit(3)\n")
    with pytest.raises(StackError, match=r"(?s)exited 3.*mypyc said no"):
        build_tree(tmp_path, python=sys.executable, env=os.environ, log_path=tmp_path / "build.log")


def test_prepared_baseline_removes_its_tree(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    real_mkdtemp = baseline_mod.tempfile.mkdtemp

    def mkdtemp(prefix: str) -> str:
        made.append(Path(real_mkdtemp(prefix=prefix, dir=tmp_path)))
        return str(made[-1])

    monkeypatch.setattr(baseline_mod.tempfile, "mkdtemp", mkdtemp)
    commit = resolve_commit("HEAD~1", repo)
    with prepared_baseline(commit, python=sys.executable, env=os.environ, log_dir=tmp_path, repo=repo) as built:
        assert built.commit == commit and built.root == made[0] / "baseline"
        assert (built.root / "proxy" / "version.txt").read_text() == "1\n"
        assert "built" in (tmp_path / "baseline-build.log").read_text()
    assert not made[0].exists()

    (repo / "setup.py").write_text("raise SystemExit(1)\n")
    _git(repo, "commit", "-q", "-am", "broken build")
    with (
        pytest.raises(StackError, match="building the baseline"),
        prepared_baseline(
            resolve_commit("HEAD", repo), python=sys.executable, env=os.environ, log_dir=tmp_path, repo=repo
        ),
    ):
        raise AssertionError("not reached")
    assert len(made) == 2 and not made[1].exists(), "removed when the build fails too"


def test_baseline_env_takes_precedence_over_the_editable_install(tmp_path: Path) -> None:
    """PYTHONPATH comes before the editable finder: `proxy` is the exported tree's."""
    tree = tmp_path / "baseline"
    (tree / "proxy").mkdir(parents=True)
    (tree / "proxy" / "__init__.py").write_text("MARK = 'baseline'\n")
    env = {**os.environ, **baseline_env(tree)}
    done = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert done.stdout.strip() == str(tree / "proxy" / "__init__.py")


# ---------------------------------------------------------------------------------------------- /proc maps


def test_uvgate_modules_and_roots() -> None:
    mapped = [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/work/wt/.venv/lib/python3.11/site-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so",
        f"/tmp/b/baseline/uvgate__mypyc.{SO}",
        f"/tmp/b/baseline/proxy/gateway.{SO}",
        f"/tmp/b/baseline/proxy/http1/protocol.{SO}",
        "/tmp/b/baseline/proxy/gateway.py",
    ]
    assert uvgate_modules(mapped) == sorted(mapped[2:5])
    code = RunningCode.from_paths(mapped)
    assert code.compiled and code.roots == ("/tmp/b/baseline",)
    assert code.describe() == "/tmp/b/baseline (compiled: 3 modules)"
    assert check_code(code, Path("/tmp/b/baseline")) is None

    mixed = RunningCode.from_paths([*mapped, f"/work/wt/uvgate__mypyc.{SO}"])
    assert mixed.roots == ("/tmp/b/baseline", "/work/wt")
    problem = check_code(mixed, Path("/tmp/b/baseline"))
    assert problem is not None and "/work/wt" in problem

    pure = RunningCode.from_paths(mapped[:2])
    assert not pure.compiled and "pure Python" in pure.describe()
    assert check_code(pure, Path("/tmp/b/baseline")) is not None


def test_nested_proxy_dirs_resolve_to_the_innermost_tree() -> None:
    code = RunningCode.from_paths([f"/srv/proxy/checkout/proxy/upstream/pool.{SO}"])
    assert code.roots == ("/srv/proxy/checkout",)


def test_mapped_files_of_this_process() -> None:
    files = mapped_files(os.getpid())
    assert os.path.realpath(sys.executable) in files or any("libpython" in f for f in files)
    assert all(f.startswith("/") for f in files)
    assert mapped_files(2**22 + 12345) == set()
