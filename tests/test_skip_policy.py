"""The skip policy (tests/skip_policy.py) on a throwaway suite run by a real pytest in a subprocess."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_suite(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_throwaway.py").write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=120)


def test_a_skip_that_names_a_gpu_or_second_host_passes(tmp_path):
    result = run_suite(tmp_path, """
        import pytest
        def test_ok(): pass
        def test_gpu(): pytest.skip("needs a GPU (CUDA): none on this machine")
        @pytest.mark.skipif(True, reason="needs a second host on the test network")
        def test_two_hosts(): pass
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: 2 (2 for an allowed reason" in result.stdout


@pytest.mark.parametrize("body", [
    "import pytest\ndef test_ok(): pass\ndef test_missing(): pytest.skip('nodes/loader.py does not exist yet')\n",
    "import pytest\ndef test_ok(): pass\ndef test_tool(): pytest.importorskip('no_such_module_here')\n",
    "import pytest\npytest.skip('fixture missing', allow_module_level=True)\n",
    "import pytest\ndef test_ok(): pass\n@pytest.mark.xfail(reason='needs a GPU')\ndef test_x(): assert False\n",
], ids=["skip-in-test", "importorskip", "module-level", "xfail"])
def test_any_other_skip_fails_the_run(tmp_path, body):
    result = run_suite(tmp_path, body)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 refused" in result.stdout and "REFUSED" in result.stdout


def test_another_exit_code_is_left_alone(tmp_path):
    """The plugin only turns a passing run into a failing one; a run that stopped with its own code keeps it."""
    result = run_suite(tmp_path, "import pytest\ndef test_s(): pytest.skip('x')\n"
                                 "def test_stop(): pytest.exit('stopped', returncode=3)\n")
    assert result.returncode == 3, result.stdout + result.stderr
