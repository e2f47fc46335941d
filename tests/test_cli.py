"""The ``qsmnet`` command line: help, argument errors as one line + exit 2, dispatch."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qsmnet.cli import main
from qsmnet.io import QSMInputError

COMMANDS = ("simulate", "predict", "run-stage", "evaluate")


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("qsmnet: error: ")
    return lines[0]


@pytest.fixture
def fake_handler(monkeypatch):
    """Install a stand-in module exposing ``func``; returns the list of calls it receives."""
    def install(module: str, func: str, behaviour=None):
        calls = []

        def handler(*args, **kwargs):
            calls.append((args, kwargs))
            return behaviour(*args, **kwargs) if behaviour else None

        mod = types.ModuleType(module)
        setattr(mod, func, handler)
        monkeypatch.setitem(sys.modules, module, mod)
        return calls
    return install


def test_help_lists_the_four_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qsmnet")
    for command in COMMANDS:
        assert command in out


def test_console_script_help_subprocess():
    script = Path(sys.executable).with_name("qsmnet")
    cmd = [str(script)] if script.exists() else [shutil.which("qsmnet") or "qsmnet"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout


def test_python_dash_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["qsmnet", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("qsmnet", run_name="__main__")
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("qsmnet 0.")


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(capsys, command):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: qsmnet {command}")


def test_unknown_stage_is_exit_2_one_line(capsys, tmp_path):
    assert main(["run-stage", "qsm", str(tmp_path), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "invalid choice: 'qsm'" in line and "field-mapping" in line


@pytest.mark.parametrize("argv,pattern", [
    ([], "required: COMMAND"),
    (["fly"], "invalid choice: 'fly'"),
    (["predict", "--phase"], "expected at least one argument"),
    (["evaluate", "a.nii.gz"], "required: TRUTH, MASK"),
    (["predict", "--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_argparse_errors_are_one_line(capsys, argv, pattern):
    assert main(argv) == 2
    assert pattern in _one_error_line(capsys.readouterr().err)


def test_predict_missing_file_writes_nothing(capsys, tmp_path, write_nifti, fake_handler):
    calls = fake_handler("qsmnet.inference.predict", "run_predict")
    mag = write_nifti(tmp_path / "mag.nii.gz", np.ones((4, 4, 4), np.float32))
    out = tmp_path / "out"
    code = main(["predict", "--phase", str(tmp_path / "phase_missing.nii.gz"), "--magnitude",
                 str(mag), "--te", "0.01", "--b0", "3", "--out", str(out)])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "phase_missing.nii.gz: file not found" in line
    assert not out.exists() and calls == []


@pytest.mark.parametrize("extra,pattern", [
    (["--te", "4", "8", "--b0", "3"], "--te: EchoTime 4 looks like milliseconds"),
    (["--te", "0.01", "0.02", "--b0", "30"], r"--b0: field strength"),
    (["--te", "0.01", "0.02"], "--te and --b0 (or --params) are required"),
    (["--te", "0.01", "0.02", "--b0", "3", "--method", "nope"], "--method: 'nope' is neither"),
    (["--te", "0.01", "0.02", "--b0", "3", "--subject", "01"], "--subject: only used with --bids"),
    (["--params", "p.json", "--te", "0.01", "0.02"], "--te: give either --params"),
])
def test_predict_argument_checks(capsys, tmp_path, write_nifti, fake_handler, extra, pattern):
    calls = fake_handler("qsmnet.inference.predict", "run_predict")
    ph = [write_nifti(tmp_path / f"ph{i}.nii.gz", np.zeros((4, 4, 4), np.float32))
          for i in range(2)]
    mg = [write_nifti(tmp_path / f"mg{i}.nii.gz", np.ones((4, 4, 4), np.float32))
          for i in range(2)]
    argv = ["predict", "--phase", *map(str, ph), "--magnitude", *map(str, mg),
            "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert pattern in _one_error_line(capsys.readouterr().err)
    assert calls == [] and not (tmp_path / "out").exists()


def test_predict_bids_checks(capsys, tmp_path, fake_handler):
    fake_handler("qsmnet.inference.predict", "run_predict")
    assert main(["predict", "--bids", str(tmp_path / "none")]) == 2
    assert "none: folder not found (--bids)" in _one_error_line(capsys.readouterr().err)
    assert main(["predict", "--bids", str(tmp_path), "--te", "0.01"]) == 2
    assert "--te: not used with --bids" in _one_error_line(capsys.readouterr().err)
    assert main(["predict"]) == 2
    assert "exactly one input" in _one_error_line(capsys.readouterr().err)
    assert main(["predict", "--bids", str(tmp_path)]) == 2  # empty dataset
    assert "part-phase_MEGRE" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "sub-01").mkdir()
    assert main(["predict", "--bids", str(tmp_path), "--subject", "01", "sub-02"]) == 2
    assert "sub-02: subject folder not found" in _one_error_line(capsys.readouterr().err)


def test_predict_dispatches_after_validation(tmp_path, write_nifti, fake_handler):
    calls = fake_handler("qsmnet.inference.predict", "run_predict", lambda args: 0)
    ph = write_nifti(tmp_path / "ph.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
    mg = write_nifti(tmp_path / "mg.nii.gz", np.ones((4, 4, 4, 2), np.float32))
    argv = ["predict", "--phase", str(ph), "--magnitude", str(mg), "--te", "0.004", "0.008",
            "--b0", "3", "--b0-dir", "0", "0.1", "1", "--out", str(tmp_path / "o"),
            "--method", "tv", "--device", "cpu", "--phase-sign", "-1", "--no-preview"]
    assert main(argv) == 0
    ((args,), _), = calls
    assert args.phase == [ph] and args.magnitude == [mg]
    assert args.te == [0.004, 0.008] and args.b0 == 3.0 and args.b0_dir == [0.0, 0.1, 1.0]
    assert args.method == "tv" and args.device == "cpu" and args.phase_sign == -1
    assert args.no_preview is True and args.out == tmp_path / "o" and args.bids is None


def test_predict_accepts_checkpoint_path(tmp_path, write_megre_subject, fake_handler):
    calls = fake_handler("qsmnet.inference.predict", "run_predict")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    write_megre_subject(tmp_path, "01")
    write_megre_subject(tmp_path, "02")
    assert main(["predict", "--bids", str(tmp_path), "--subject", "01", "02",
                 "--method", str(ckpt)]) == 0
    ((args,), _), = calls
    assert args.method == str(ckpt) and args.subject == ["01", "02"] and args.out is None


def test_run_stage_checks_and_dispatch(capsys, tmp_path, write_qsmci_folder, fake_handler):
    calls = fake_handler("qsmnet.inference.stages", "run_stage_cli")
    write_qsmci_folder(tmp_path / "in", "dipole")
    (tmp_path / "in" / "mask.nii.gz").unlink()
    assert main(["run-stage", "dipole", str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "mask.nii.gz: file not found" in line and calls == []
    assert not (tmp_path / "out").exists()

    write_qsmci_folder(tmp_path / "in", "dipole")
    assert main(["run-stage", "dipole", str(tmp_path / "in"), str(tmp_path / "out"),
                 "--method", "tkd", "--device", "auto"]) == 0
    ((args,), _), = calls
    assert args.stage == "dipole" and args.in_dir == tmp_path / "in"
    assert args.out_dir == tmp_path / "out" and args.method == "tkd"


def test_evaluate_checks_and_dispatch(capsys, tmp_path, write_nifti, fake_handler):
    calls = fake_handler("qsmnet.metrics.evaluate", "run_evaluate_cli", lambda args: 0)
    files = [write_nifti(tmp_path / f"{n}.nii.gz", np.ones((4, 4, 4), np.float32))
             for n in ("pred", "truth", "mask")]
    assert main(["evaluate", str(files[0]), str(tmp_path / "truth_missing.nii.gz"),
                 str(files[2])]) == 2
    assert "truth_missing.nii.gz: file not found" in _one_error_line(capsys.readouterr().err)
    assert main(["evaluate", *map(str, files), "--erode-mm", "-1"]) == 2
    assert "--erode-mm" in _one_error_line(capsys.readouterr().err)
    assert main(["evaluate", *map(str, files), "--json", str(tmp_path / "m.json"),
                 "--erode-mm", "2"]) == 0
    ((args,), _), = calls
    assert args.pred == files[0] and args.json == tmp_path / "m.json" and args.erode_mm == 2.0


def test_simulate_dispatch_passes_only_given_options(tmp_path, fake_handler):
    calls = fake_handler("qsmnet.simulation.bids", "write_simulated_subject")
    assert main(["simulate", "--out", str(tmp_path / "bids"), "--subject", "07", "--seed", "3",
                 "--shape", "16", "16", "16", "--b0-dir", "0", "0.2", "1",
                 "--te", "0.004", "0.012"]) == 0
    ((pos, kwargs),) = calls
    assert pos == (tmp_path / "bids",)
    assert kwargs == {"subject": "07", "seed": 3, "shape": (16, 16, 16),
                      "b0_dir": (0.0, 0.2, 1.0), "te_s": (0.004, 0.012)}
    assert main(["simulate", "--out", str(tmp_path / "b2"), "--voxel-size", "1", "1", "2",
                 "--b0", "7", "--snr", "50"]) == 0
    assert calls[1][1] == {"subject": "01", "seed": 0, "voxel_size_mm": (1.0, 1.0, 2.0),
                           "b0_t": 7.0, "peak_snr": 50.0}


def test_simulate_bad_values(capsys, tmp_path, fake_handler):
    calls = fake_handler("qsmnet.simulation.bids", "write_simulated_subject")
    assert main(["simulate", "--out", str(tmp_path), "--te", "5"]) == 2
    assert "looks like milliseconds" in _one_error_line(capsys.readouterr().err)
    assert main(["simulate", "--out", str(tmp_path), "--subject", "0-1"]) == 2
    assert "--subject" in _one_error_line(capsys.readouterr().err)
    assert calls == []


def test_handler_errors(capsys, tmp_path, write_qsmci_folder, fake_handler):
    write_qsmci_folder(tmp_path / "in", "bfr")
    argv = ["run-stage", "bfr", str(tmp_path / "in"), str(tmp_path / "out")]

    def bad_input(args):
        raise QSMInputError("totalfield.nii.gz: something is off\nsecond line")

    fake_handler("qsmnet.inference.stages", "run_stage_cli", bad_input)
    assert main(argv) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        "qsmnet: error: totalfield.nii.gz: something is off second line"
    assert main([*argv, "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("qsmnet: error:")

    def crash(args):
        raise RuntimeError("boom")

    fake_handler("qsmnet.inference.stages", "run_stage_cli", crash)
    assert main(argv) == 1
    assert "RuntimeError: boom" in _one_error_line(capsys.readouterr().err)

    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", "/x/weights.pt")

    fake_handler("qsmnet.inference.stages", "run_stage_cli", missing)
    assert main(argv) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        "qsmnet: error: /x/weights.pt: No such file or directory"


def test_unavailable_handler_module(capsys, tmp_path, write_nifti, monkeypatch):
    monkeypatch.setitem(sys.modules, "qsmnet.metrics.evaluate", None)  # import fails
    files = [write_nifti(tmp_path / f"{n}.nii.gz", np.ones((4, 4, 4), np.float32))
             for n in ("p", "t", "m")]
    assert main(["evaluate", *map(str, files)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("qsmnet: error: evaluate: cannot load qsmnet.metrics.evaluate")


def test_method_tfi_on_a_local_field_is_refused(capsys, tmp_path, write_qsmci_folder):
    """TFI's chi needs the total field: the dipole stage (a local field) refuses it, writing
    nothing."""
    write_qsmci_folder(tmp_path / "in", "dipole")
    assert main(["run-stage", "dipole", str(tmp_path / "in"), str(tmp_path / "out"),
                 "--method", "tfi", "--bfr", "tfi", "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--method tfi: chi comes from the total-field inversion" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii*"))
