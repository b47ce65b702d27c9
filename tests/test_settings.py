from pathlib import Path

import pytest

from anomalyzoo import get_globals, print_globals, set_globals
from anomalyzoo.settings import get_settings, reset_globals


def test_set_and_get_globals(tmp_path, capsys):
    set_globals(dataset_dir=tmp_path / "d", backbone_dir=str(tmp_path / "b"), seed=7, num_workers=0)
    values = get_globals()
    assert values["dataset_dir"] == tmp_path / "d"
    assert values["BACKBONE_DIR"] == tmp_path / "b"
    assert values["SEED"] == 7 and get_settings().seed == 7
    print_globals()
    assert "SEED" in capsys.readouterr().out


def test_unknown_setting_is_an_error():
    with pytest.raises(TypeError, match="dataset_dri"):
        set_globals(dataset_dri="x")


def test_environment_variables_set_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALYZOO_DATASET_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ANOMALYZOO_BACKBONE_DIR", str(tmp_path / "weights"))
    reset_globals()
    assert get_settings().dataset_dir == Path(tmp_path / "data")
    assert get_settings().backbone_dir == Path(tmp_path / "weights")
