"""`ganforge bench load` refuses a repository it cannot load in one line and exit 2, like every
usage error of the CLI, before it starts a client."""

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "missing", "--repository: {} is not a folder"),
    (lambda tmp: tmp, "--repository: no servable models in {}"),
])
def test_a_repository_without_models_is_one_error_line_and_exit_2(tmp_path, make, message):
    repository = make(tmp_path)
    r = run_cli("bench", "load", "--repository", str(repository), "--duration", "1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {message.format(repository)}"]
