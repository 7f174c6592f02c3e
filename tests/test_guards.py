"""The suite's own rules (tests/guard): nothing reads a path outside the repository, and a test not
marked e2e opens no socket. Each guard is shown catching what it is for, on a fake clone with a
sibling folder in tmp_path; a static check looks for outside paths spelled in the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from collector_guard import ENV_CONFIG, ENV_NO_SOCKETS, Guard, Layout, Violation, activate, deactivate
from guard_plugin import GUARD_DIR

from tests.brokers import SharedBroker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A clone and, beside it, a sibling folder (both in a temporary folder) a user's machine does not
    have; the tests read it on purpose, to see the guard flag the reads."""
    clone, shared = tmp_path / "clone", tmp_path / "neighbour"
    (clone / "tests").mkdir(parents=True)
    (clone / "README.md").write_text("inside\n")
    (shared / "fixtures").mkdir(parents=True)
    (shared / "fixtures" / "recorded.ws").write_text("outside\n")
    return clone, shared


def reads_seen(clone: Path, read: Callable[[], object]) -> list[Violation]:
    guard = Guard(Layout.of(clone))
    activate(guard)
    try:
        read()
    finally:
        deactivate(guard)
    return guard.found


def test_reads_of_a_sibling_folder_are_flagged_and_reads_inside_or_of_the_system_are_not(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    clone, shared = layout
    sibling = shared / "fixtures" / "recorded.ws"
    (clone / "tests" / "link.ws").symlink_to(sibling)  # inside by name, outside in fact
    monkeypatch.chdir(clone)

    def read() -> None:
        (clone / "README.md").read_text()
        Path("README.md").read_text()
        Path(sys.executable).resolve().read_bytes()[:10]
        Path("/proc/self/status").read_text()
        sibling.read_text()
        Path(os.path.relpath(sibling, clone)).read_bytes()  # relative to the clone, as tests run
        os.listdir(shared)
        list(os.scandir(clone.parent))
        (clone / "tests" / "link.ws").read_text()
        with open(os.fsencode(sibling), "rb"):  # bytes paths too
            pass

    found = reads_seen(clone, read)
    assert found == [
        Violation("read", str(sibling)),
        Violation("read", str(sibling)),
        Violation("read", str(shared)),
        Violation("read", str(clone.parent)),
        Violation("read", str(sibling)),
        Violation("read", str(sibling)),
    ]
    assert "read outside the repository: " + str(sibling) in found[0].describe()


def test_hidden_tool_folders_beside_the_clone_are_not_the_projects(layout: tuple[Path, Path]) -> None:
    clone, _ = layout
    cache = clone.parent / ".cache" / "tool"
    cache.mkdir(parents=True)
    (cache / "state").write_text("x")
    assert reads_seen(clone, lambda: (cache / "state").read_text()) == []


def test_a_clone_directly_in_the_temporary_folder_may_use_it() -> None:
    """Logs, pytest's tmp_path and tempfile's files sit beside such a clone: they are not a sibling."""
    temp = Path(tempfile.gettempdir()).resolve()
    layout = Layout.of(temp / "exchange-collector")
    assert layout.watched == (str(temp),)
    assert layout.outside(temp / "pytest-of-someone" / "test0" / "c.yaml") is None


def test_a_git_worktree_also_watches_its_main_checkouts_folder(tmp_path: Path) -> None:
    main, worktree = tmp_path / "main", tmp_path / "worktrees" / "branch"
    (main / ".git" / "worktrees" / "branch").mkdir(parents=True)
    worktree.mkdir(parents=True)
    (worktree / ".git").write_text(f"gitdir: {main}/.git/worktrees/branch\n")
    (tmp_path / "neighbour").mkdir()
    (tmp_path / "neighbour" / "DESIGN.md").write_text("beside the main checkout\n")
    layout = Layout.of(worktree)
    assert set(layout.watched) == {str(tmp_path), str(tmp_path / "worktrees")}
    assert layout.outside(tmp_path / "neighbour" / "DESIGN.md") == str(tmp_path / "neighbour" / "DESIGN.md")
    assert layout.outside(main / "README.md") == str(main / "README.md")  # another checkout is outside
    assert layout.outside(worktree / "README.md") is None


INNER_CONFTEST = """
import sys
from pathlib import Path

sys.path.insert(0, {guard_dir!r})
from guard_plugin import GuardPlugin


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: may open sockets")
    plugin = GuardPlugin(Path(__file__).resolve().parent)
    plugin.start()
    config.pluginmanager.register(plugin, "collector-guard")
    config.add_cleanup(plugin.stop)
"""

INNER_TESTS = """
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SIBLING = os.environ["TEST_SIBLING"]  # the layout's sibling file, relative to the clone


def test_reads_inside():
    assert Path("README.md").read_text() == "inside\\n"


def test_reads_a_sibling():
    Path(SIBLING).read_text()


def test_lists_the_parent():
    list(Path("..").iterdir())


def test_a_child_process_reads_a_sibling():
    subprocess.run([sys.executable, "-c", f"open({SIBLING!r}).read()"], check=True)


def test_opens_a_socket_and_hides_the_error():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except Exception:
        pass


def test_a_child_process_opens_a_socket():
    subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('localhost', 80)"])


def test_an_event_loop_is_no_socket():
    import asyncio

    asyncio.run(asyncio.sleep(0))  # its self-pipe is a socketpair: no network
"""


def run_inner_session(clone: Path, tests: str, *options: str) -> subprocess.CompletedProcess[str]:
    """A pytest session on the fake clone with the guard installed the way tests/conftest.py does."""
    (clone / "conftest.py").write_text(INNER_CONFTEST.format(guard_dir=str(GUARD_DIR)))
    (clone / "test_inner.py").write_text(textwrap.dedent(tests))
    env = {k: v for k, v in os.environ.items() if k not in (ENV_CONFIG, ENV_NO_SOCKETS, "PYTHONPATH")}
    env["TEST_SIBLING"] = os.path.join("..", "neighbour", "fixtures", "recorded.ws")  # the layout's
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
         *(options or ["-p", "no:xdist"]), "test_inner.py"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_session_fails_each_test_that_reads_outside_or_opens_a_socket_and_lists_what_it_did(
    layout: tuple[Path, Path],
) -> None:
    clone, shared = layout
    result = run_inner_session(clone, INNER_TESTS)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    outcomes = {
        name: outcome for outcome, name in re.findall(r"^(PASSED|FAILED) test_inner\.py::(\w+)", out, re.M)
    }
    assert outcomes == {
        "test_reads_inside": "PASSED",
        "test_reads_a_sibling": "FAILED",
        "test_lists_the_parent": "FAILED",
        "test_a_child_process_reads_a_sibling": "FAILED",
        "test_opens_a_socket_and_hides_the_error": "FAILED",
        "test_a_child_process_opens_a_socket": "FAILED",
        "test_an_event_loop_is_no_socket": "PASSED",
    }, out
    sibling = shared / "fixtures" / "recorded.ws"
    assert f"read outside the repository: {sibling}\n" in out
    assert f"read outside the repository: {sibling}  (in pid " in out  # the child's read
    assert f"read outside the repository: {clone.parent}\n" in out
    assert "socket in a test not marked e2e: socket.socket(family=AF_INET)\n" in out
    assert "socket in a test not marked e2e: socket.getaddrinfo('localhost')  (in pid " in out


def test_under_xdist_each_read_is_reported_once_by_the_process_that_ran_the_test(
    layout: tuple[Path, Path],
) -> None:
    clone, shared = layout
    tests = """
        import os
        from pathlib import Path

        def test_reads_a_sibling():
            Path(os.environ["TEST_SIBLING"]).read_text()

        def test_reads_inside():
            Path("README.md").read_text()
        """
    result = run_inner_session(clone, tests, "-n", "2")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert (
        "FAILED test_inner.py::test_reads_a_sibling" in out
        and "PASSED test_inner.py::test_reads_inside" in out
    )
    # Under CI (the CI variable set) pytest repeats the whole message in the short summary, so
    # count only the failure reports themselves.
    reports = out.split("short test summary info")[0]
    assert reports.count(f"read outside the repository: {shared / 'fixtures' / 'recorded.ws'}") == 1, out


@pytest.mark.e2e  # the inner test really opens a socket
def test_a_test_marked_e2e_may_open_sockets(layout: tuple[Path, Path]) -> None:
    clone, _ = layout
    result = run_inner_session(
        clone,
        """
        import socket
        import pytest

        @pytest.mark.e2e
        def test_opens_a_socket():
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED test_inner.py::test_opens_a_socket" in result.stdout


def test_a_test_on_the_shared_broker_may_not_write_a_topic_another_test_wrote() -> None:
    shared = SharedBroker()
    assert shared.claim({"market.trade.test.a", "raw.test"}, "test_one") == {}
    assert shared.claim({"market.trade.test.a"}, "test_one") == {}  # its own, again
    assert shared.claim({"market.trade.test.b", "raw.test"}, "test_two") == {"raw.test": "test_one"}
    assert shared.owners == {
        "market.trade.test.a": "test_one", "raw.test": "test_one", "market.trade.test.b": "test_two"
    }  # fmt: skip


# -- static check: paths outside the repository spelled in the code, the Makefile and CI ---------------

CHECKED_SUFFIXES = {".py", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".mk"}
CHECKED_NAMES = {"Makefile", "Dockerfile"}
# (file, text on the line): strings that look like outside paths and are not read as paths.
ALLOWED = {
    ("tests/test_operator_input.py", '"../../etc"'): "a path-traversal attempt fed to the operator API",
    ("tests/guard/collector_guard.py", 'first != ".."'): "a comparison with the parent folder's name",
}
NOT_CHECKED = {"tests/test_guards.py": "its examples of what the check finds"}
# `..` as a path: followed by `/`, a quote or the line's end (Lua's `a .. b` concatenation is no path).
_PARENT_REFERENCE = re.compile(r"(?<![\w./\\`])(\.\.(?:/[^\s\"'`),;]*)?)(?=/|[\"'`),;]|$)")
_PARENTS_INDEX = re.compile(r"__file__.*\.parents\[(\d+)\]")
_PARENT_CHAIN = re.compile(r"__file__[^\n]*?((?:\.parent\b)+)")
_MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|home|Users|root|mnt)/")
_HOME = re.compile(r"expanduser\(|Path\.home\(\)|[\"']~/")


def outside_references(path: str, text: str) -> list[str]:
    """`path:line: text` of each line of a repository file that names a place outside the repository."""
    depth = len(Path(path).parts) - 1  # folders between the repository root and the file
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        bad = False
        for match in _PARENT_REFERENCE.finditer(line):
            target = match.group(1)
            from_file = os.path.normpath(os.path.join(os.path.dirname(path), target))
            from_root = os.path.normpath(target)
            # Code runs from the repository root; a config file's comment may point from its folder.
            relative_to_file = Path(path).suffix in {".yaml", ".yml", ".toml", ".cfg", ".ini"}
            bad |= from_root.startswith("..") and not (relative_to_file and not from_file.startswith(".."))
        if path.endswith(".py"):
            bad |= any(int(k) > depth for k in _PARENTS_INDEX.findall(line))
            bad |= any(chain.count(".parent") > depth + 1 for chain in _PARENT_CHAIN.findall(line))
        bad |= bool(_MACHINE_PATH.search(line) or _HOME.search(line))
        if bad and not any(path == p and allowed in line for p, allowed in ALLOWED):
            found.append(f"{path}:{number}: {line.strip()}")
    return found


def repository_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build"}
        listed = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts)
        ]
    return [
        name
        for name in listed
        if not name.startswith("tests/fixtures/") and name not in NOT_CHECKED
        and (Path(name).suffix in CHECKED_SUFFIXES or Path(name).name in CHECKED_NAMES
             or name.startswith(".ci/"))
    ]  # fmt: skip


def test_no_code_makefile_or_ci_file_names_a_path_outside_the_repository() -> None:
    files = repository_files()
    assert "Makefile" in files and "tests/harness.py" in files and ".ci/run" in files
    found = [ref for name in files for ref in outside_references(name, (REPO / name).read_text())]
    assert found == [], "paths outside the repository:\n" + "\n".join(found)


# Lines that stay inside the repository although they climb a folder or two: data too, like FLAGGED.
INSIDE = json.loads((REPO / "tests" / "fixtures" / "inside-references.json").read_text())


@pytest.mark.parametrize(("path", "line"), [tuple(case) for case in INSIDE])
def test_the_static_check_tells_outside_paths_from_inside_ones(path: str, line: str) -> None:
    assert not outside_references(path, line)


# Lines the static check must flag: kept as data, so the repository's code names no outside path.
FLAGGED = json.loads((REPO / "tests" / "fixtures" / "outside-references.json").read_text())


@pytest.mark.parametrize(("path", "line"), [tuple(case) for case in FLAGGED])
def test_the_static_check_flags_each_way_of_naming_an_outside_path(path: str, line: str) -> None:
    assert outside_references(path, line)
