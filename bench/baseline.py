"""`--baseline REF`: the proxy of another commit, built and run beside the working tree's.

The commit's tracked files are exported with `git archive` into a temporary directory (the
repository's refs, index and worktrees are left alone), its hot path is compiled in place there by
this interpreter (`setup.py build_ext --inplace`, with the mypy/mypyc of this venv), and its proxy is
started with `PYTHONPATH=<that tree>`. That is enough because sys.path is searched before the
editable install's finder (a meta-path finder appended after the path finder), so `proxy` and the
top-level `uvgate__mypyc` library resolve to the exported tree. Should the tree lack something the
finder maps, the working tree's copy would be imported instead: `/proc/<pid>/maps` tells which
compiled uvgate modules a process really runs, and `check_code` insists that they are the tree's.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from devstack import PROJECT_ROOT, Process, StackError
from devstack.procfs import mapped_files, process_tree

__all__ = [
    "BUILD_TIMEOUT",
    "PROXY_PATHS",
    "Baseline",
    "Commit",
    "RunningCode",
    "baseline_env",
    "build_tree",
    "check_code",
    "export_tree",
    "prepared_baseline",
    "resolve_commit",
    "running_code",
    "uvgate_modules",
    "worktree_label",
]

PROXY_PATHS = ("proxy", "setup.py", "setup.cfg", "pyproject.toml")
"""What the proxy's build and code are made of, for `worktree_label`."""

BUILD_TIMEOUT = 600.0
"""Seconds the mypyc build of the baseline may take (it takes 20 to 40 s on 2 busy cores)."""


@dataclass(frozen=True, slots=True)
class Commit:
    """A commit as asked for (`ref`) and resolved."""

    ref: str
    sha: str
    short: str


@dataclass(frozen=True, slots=True)
class Baseline:
    """A built baseline: its commit, its source tree and how long the build took."""

    commit: Commit
    root: Path
    build_seconds: float


@dataclass(frozen=True, slots=True)
class RunningCode:
    """The compiled uvgate modules mapped into a process tree, and the trees they come from."""

    modules: tuple[str, ...]
    roots: tuple[str, ...]

    @classmethod
    def from_paths(cls, mapped: Iterable[str]) -> RunningCode:
        """From the paths of mapped files: the uvgate modules among them and their trees."""
        modules = uvgate_modules(mapped)
        return cls(tuple(modules), tuple(sorted({_root(m) for m in modules})))

    @property
    def compiled(self) -> bool:
        """False when no compiled uvgate module is mapped (pure Python, or not imported yet)."""
        return bool(self.modules)

    def describe(self) -> str:
        """One line for the console, e.g. `/tmp/x/baseline (compiled: 9 modules)`."""
        if not self.modules:
            return "no compiled uvgate module mapped (pure Python?)"
        return f"{', '.join(self.roots)} (compiled: {len(self.modules)} modules)"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise StackError(f"git {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def resolve_commit(ref: str, repo: Path = PROJECT_ROOT) -> Commit:
    """The commit `ref` names in `repo`; StackError if it names none."""
    try:
        sha = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    except StackError:
        raise StackError(f"--baseline {ref}: no such commit in {repo}") from None
    return Commit(ref, sha, _git(repo, "rev-parse", "--short", sha))


def worktree_label(repo: Path = PROJECT_ROOT) -> str:
    """What the working tree's proxy is: `working tree at <short>`, plus a note if proxy/ has changes."""
    try:
        head = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", *PROXY_PATHS)
    except (StackError, OSError):
        return "working tree (not a git checkout)"
    return f"working tree at {head}" + (" + uncommitted changes to the proxy" if dirty else "")


def export_tree(commit: Commit, dest: Path, repo: Path = PROJECT_ROOT) -> None:
    """Write the tracked files of `commit` into `dest` (`git archive`, unpacked with tar)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest.parent / f"{dest.name}.tar"
    try:
        _git(repo, "archive", "--format=tar", "-o", str(archive), commit.sha)
        done = subprocess.run(
            ["tar", "-x", "-f", str(archive), "-C", str(dest)], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise StackError(f"unpacking {commit.short} failed: {done.stderr.strip()}")
    finally:
        archive.unlink(missing_ok=True)


def baseline_env(root: Path) -> dict[str, str]:
    """Environment overrides that make `python -m proxy` (and the build) import from `root` only."""
    return {"PYTHONPATH": str(root)}


def build_tree(root: Path, *, python: str, env: Mapping[str, str], log_path: Path) -> float:
    """Compile the hot path of `root` in place (as `make build` does); seconds taken.

    Runs as a devstack `Process` (own process group, stopped with the compilers it started also on
    Ctrl-C); StackError with the log tail if the build fails or takes over BUILD_TIMEOUT.
    """
    started = time.monotonic()
    build = Process(
        "baseline-build",
        [python, "setup.py", "-q", "build_ext", "--inplace"],
        log_path=log_path,
        env={**env, **baseline_env(root)},
        cwd=root,
    )
    try:
        status = build.wait(BUILD_TIMEOUT)
    except TimeoutError:
        status = None
    finally:
        build.stop(5.0)
    if status != 0:
        outcome = "timed out" if status is None else f"exited {status}"
        raise StackError(f"building the baseline in {root} {outcome}; log {log_path}:\n{build.log_tail()}")
    return time.monotonic() - started


@contextlib.contextmanager
def prepared_baseline(
    commit: Commit, *, python: str, env: Mapping[str, str], log_dir: Path, repo: Path = PROJECT_ROOT
) -> Iterator[Baseline]:
    """Export and build `commit` in a temporary directory, removed on exit whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="uvgate-bench-baseline-"))
    try:
        root = tmp / "baseline"
        export_tree(commit, root, repo)
        seconds = build_tree(root, python=python, env=env, log_path=log_dir / "baseline-build.log")
        yield Baseline(commit, root, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def uvgate_modules(paths: Iterable[str]) -> list[str]:
    """The compiled uvgate modules among mapped files: `*__mypyc*.so` and `.so` files in a `proxy/` package."""
    found = set()
    for path in paths:
        pure = PurePosixPath(path)
        if pure.suffix == ".so" and ("__mypyc" in pure.name or "proxy" in pure.parts[:-1]):
            found.add(path)
    return sorted(found)


def _root(module: str) -> str:
    """The source tree a compiled module belongs to: the directory above its `proxy/` package."""
    parts = PurePosixPath(module).parts
    packages = [i for i, part in enumerate(parts[:-1]) if part == "proxy"]
    if packages:
        return str(PurePosixPath(*parts[: packages[-1]]))
    return str(PurePosixPath(module).parent)


def running_code(pid: int) -> RunningCode:
    """The compiled uvgate modules mapped by `pid` and its descendants (e.g. supervisor and workers)."""
    mapped: set[str] = set()
    for member in process_tree(pid):
        mapped |= mapped_files(member)
    return RunningCode.from_paths(mapped)


def check_code(code: RunningCode, root: Path) -> str | None:
    """Why `code` is not (only) the compiled build in `root`, or None if it is."""
    if not code.compiled:
        return f"no compiled uvgate module is mapped, so it cannot be told whether {root} is what runs"
    foreign = [r for r in code.roots if Path(r) != root]
    if foreign:
        return f"it runs compiled uvgate code from {', '.join(foreign)}, not only from {root}"
    return None
