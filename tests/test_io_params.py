"""qsmnet.io.params: QSM-CI params.json written and read back, and every refusal.

Truths: the JSON text itself (read with the standard library), exact round trips of the
values, and the documented schema ``{"TE": [s], "B0": T, "B0_dir": [x, y, z], "voxel_size": [mm]}``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qsmnet.io.errors import QSMInputError
from qsmnet.io.params import AcquisitionParams, read_params_json, write_params_json


def _write(tmp_path, obj, name="params.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


FULL = {"TE": [0.004, 0.012], "B0": 2.89, "B0_dir": [0.0, 0.6, 0.8], "voxel_size": [1.0, 1.2, 2.0]}


def test_write_then_read_round_trips_every_value(tmp_path):
    path = write_params_json(tmp_path / "params.json", te_s=(0.004, 0.012), b0_t=2.89,
                             b0_dir=(0.0, 3.0, 4.0), voxel_size_mm=(1, 1.2, 2))
    assert path == tmp_path / "params.json"
    # the file is plain JSON in the schema, the direction stored as a unit vector
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert set(on_disk) == {"TE", "B0", "B0_dir", "voxel_size"}
    assert on_disk["TE"] == [0.004, 0.012] and on_disk["B0"] == 2.89
    assert on_disk["voxel_size"] == [1.0, 1.2, 2.0]
    np.testing.assert_allclose(on_disk["B0_dir"], [0.0, 0.6, 0.8], rtol=0, atol=1e-15)
    params = read_params_json(path)
    assert isinstance(params, AcquisitionParams)
    assert params.te_s == (0.004, 0.012) and params.b0_t == 2.89
    assert np.array_equal(params.b0_dir, np.asarray(on_disk["B0_dir"]))
    assert params.voxel_size_mm.dtype == np.float64
    assert np.array_equal(params.voxel_size_mm, [1.0, 1.2, 2.0])
    assert params.source == str(path)
    # written atomically: nothing but the target is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["params.json"]


def test_optional_keys_are_none_when_absent(tmp_path):
    params = read_params_json(_write(tmp_path, {"TE": [0.01], "B0": 3}))
    assert params.te_s == (0.01,) and params.b0_t == 3.0
    assert params.b0_dir is None and params.voxel_size_mm is None
    # a non-unit direction is normalised
    params = read_params_json(_write(tmp_path, {**FULL, "B0_dir": [0, 0, 2]}))
    assert np.array_equal(params.b0_dir, [0.0, 0.0, 1.0])


def test_stages_without_phase_need_neither_te_nor_b0(tmp_path):
    params = read_params_json(_write(tmp_path, {"B0_dir": [0, 0, 1]}), require_te=False,
                              require_b0=False)
    assert params.te_s is None and params.b0_t is None
    params = read_params_json(_write(tmp_path, {"TE": [], "B0": 3}), require_te=False)
    assert params.te_s is None
    # qsm-ci's placeholder TE [1.0] is accepted there, and refused where TE is used
    placeholder = _write(tmp_path, {"TE": [1.0], "B0": 3})
    assert read_params_json(placeholder, require_te=False).te_s == (1.0,)
    with pytest.raises(QSMInputError, match=r"^params.json TE: EchoTime 1 looks like milli"):
        read_params_json(placeholder)
    with pytest.raises(QSMInputError, match="looks like milliseconds"):
        read_params_json(_write(tmp_path, {"TE": [4.0], "B0": 3}), require_te=False)


@pytest.mark.parametrize("obj, match", [
    ("{not json", r"^params.json: cannot parse as JSON"),
    ("[0.01, 3]", r"^params.json: expected a JSON object"),
    ({"B0": 3}, r"^params.json: no TE \(echo times in seconds\)$"),
    ({"TE": [], "B0": 3}, r"^params.json: no TE"),
    ({"TE": [0.01]}, r"^params.json: no B0 \(field strength in tesla\)$"),
    ({"EchoTime": 0.01, "B0": 3}, r"no TE .*params.json names them EchoTime -> TE\)$"),
    ({"TE": [0.01], "MagneticFieldStrength": 3},
     r"no B0 .*names them MagneticFieldStrength -> B0\)$"),
    ({**FULL, "TE": [0.012, 0.004]}, r"^params.json TE: .*strictly increasing"),
    ({**FULL, "TE": [12.0]}, r"^params.json TE: .*milliseconds"),
    ({**FULL, "B0": 0}, r"^params.json B0: field strength 0 T is outside"),
    ({**FULL, "B0": "3T"}, r"^params.json B0: .*not a number"),
    ({**FULL, "B0_dir": [0, 0, 0]}, r"^params.json B0_dir: .*non-zero length"),
    ({**FULL, "B0_dir": [0, 1]}, r"^params.json B0_dir: .*not 3 finite numbers"),
    ({**FULL, "voxel_size": [1, 1]}, r"^params.json: voxel_size \[1, 1\] must be 3 positive"),
    ({**FULL, "voxel_size": [1, 0, 1]}, r"^params.json: voxel_size .* must be 3 positive"),
    ({**FULL, "voxel_size": [1, "a", 1]}, r"^params.json: voxel_size .* is not 3 numbers"),
])
def test_refusals_name_the_file(tmp_path, obj, match):
    with pytest.raises(QSMInputError, match=match):
        read_params_json(_write(tmp_path, obj))


def test_missing_file_gives_the_path_as_passed(tmp_path):
    missing = tmp_path / "nowhere" / "params.json"
    with pytest.raises(QSMInputError, match=r"params.json: file not found$") as info:
        read_params_json(missing)
    assert str(info.value) == f"{missing}: file not found"


def test_messages_name_the_base_name_not_the_folder(tmp_path):
    path = _write(tmp_path, {"TE": [0.01]}, name="sub-01_params.json")
    with pytest.raises(QSMInputError) as info:
        read_params_json(path)
    assert str(info.value).startswith("sub-01_params.json: no B0")
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"te_s": [0.02, 0.01]}, r"^TE: .*strictly increasing"),
    ({"b0_t": 25.0}, r"^B0: .*outside"),
    ({"b0_dir": (0, 0, 0)}, r"^B0_dir: "),
    ({"voxel_size_mm": (1, 1, -1)}, r"^voxel_size .* must be 3 positive"),
    ({"voxel_size_mm": (1, 1)}, r"^voxel_size .* must be 3 positive"),
])
def test_write_validates_before_writing(tmp_path, kwargs, match):
    args = {"te_s": [0.01], "b0_t": 3.0, "b0_dir": (0, 0, 1), "voxel_size_mm": (1, 1, 1)}
    with pytest.raises(QSMInputError, match=match):
        write_params_json(tmp_path / "params.json", **{**args, **kwargs})
    assert not any(tmp_path.iterdir())


def test_values_survive_json_exactly(tmp_path):
    """Echo times that are not exact in binary come back bit for bit (JSON repr round trip)."""
    te = (0.1 * 0.3, math.pi / 100, 0.0471)
    read = read_params_json(write_params_json(tmp_path / "p.json", te, 6.98, (0.1, 0.2, 0.97),
                                              (0.6, 0.6, 0.6)))
    assert read.te_s == te and read.b0_t == 6.98
    np.testing.assert_allclose(read.b0_dir, np.array([0.1, 0.2, 0.97]) / math.hypot(0.1, 0.2, 0.97),
                               rtol=0, atol=1e-15)
