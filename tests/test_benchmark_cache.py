"""The benchmark's result cache follows the shipped model: rows measured with another model are
measured again, the classical rows are kept."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from qsmnet.inference.model_store import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("qsmnet_benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_of_another_shipped_model_are_dropped_and_classical_rows_kept():
    bench = _benchmark()
    res = {"model": {"name": "an-earlier-model", "sha256": "0" * 64},
           "dipole": {"c/unet": 1.0, "c/unet-nodc": 2.0, "c/tv_masked+dc": 3.0, "c/tv": 4.0},
           "chi": {"c/pdf/phase/unet": 5.0, "c/tfi/phase/tfi_chi": 6.0, "c/lbv/phase/tkd": 7.0}}
    bench.drop_stale_model_rows(res, ("dipole", "chi"))
    assert res["dipole"] == {"c/tv": 4.0}
    assert res["chi"] == {"c/tfi/phase/tfi_chi": 6.0, "c/lbv/phase/tkd": 7.0}
    assert res["model"]["sha256"] == hashlib.sha256(SHIPPED_MODEL.read_bytes()).hexdigest()
    # measured again with the installed model: kept on the next run
    res["dipole"]["c/unet"] = 8.0
    bench.drop_stale_model_rows(res, ("dipole", "chi"))
    assert res["dipole"] == {"c/tv": 4.0, "c/unet": 8.0}


def test_force_remeasures_the_selected_speed_run_and_keeps_the_others(tmp_path, monkeypatch):
    # speed measures in a spawned process, which must import the script's module by name
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = importlib.import_module("benchmark")
    bench.RESULTS = tmp_path
    other = {"seconds_total": 123.0, "peak_rss_mb": 1.0}
    stale = {"seconds_total": -1.0, "peak_rss_mb": -1.0}
    bench._save(tmp_path / "speed.json",
                {"runs": {"cpu/256x256x176/unet": other, "cpu/32x32x32/tv": stale}})
    res = bench.run_speed([(32, 32, 32)], ["tv"], force=True)
    # the row measured before with another command survives --force
    assert res["runs"]["cpu/256x256x176/unet"] == other
    # the selected row was measured again: a real run takes a positive time and memory
    again = res["runs"]["cpu/32x32x32/tv"]
    assert again["seconds_total"] > 0 and again["peak_rss_mb"] > 0
    assert bench._load(tmp_path / "speed.json")["runs"] == res["runs"]
