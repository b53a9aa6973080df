"""The committed model repository: every config parses with Triton's schema, every manifest
matches its files."""


import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ganforge.errors import RepositoryError
from ganforge.serving import repository as repo
from tests.conftest import ROOT

COMMITTED = sorted((ROOT / "model_repository").glob("*/config.pbtxt"))


def test_the_committed_repository_is_not_empty():
    assert COMMITTED, "model_repository/ ships no models"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_every_committed_config_parses_into_tritons_model_config(path):
    cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == path.parent.name
    if cfg.platform == "onnxruntime_onnx":
        assert cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching") and cfg.model_warmup


def test_every_committed_manifest_matches_its_files():
    configs = repo.check_repository(ROOT / "model_repository")
    assert set(configs) == {p.parent.name for p in COMMITTED}


def test_a_malformed_config_is_named_with_its_file(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.pbtxt").write_text('name: "broken"\nmax_batch_size: "many"\n')
    with pytest.raises(RepositoryError, match=r"broken/config.pbtxt: malformed config.pbtxt"):
        repo.check_repository(tmp_path)
    (bad / "config.pbtxt").write_text('name: "broken"\nno_such_field: 1\n')
    with pytest.raises(RepositoryError, match="no_such_field"):
        repo.check_repository(tmp_path)
