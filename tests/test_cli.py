"""Bad command-line input: one line naming the value and the fix, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from engine import recipe as cli


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        code = cli.main(argv)
        raise SystemExit(code)
    captured = capsys.readouterr()
    return info.value.code, captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["table99"], "unknown recipe 'table99'; choose from"),
        (["table1", "--n1", "shallow_cnn_w16,resnet9"], "unknown model 'resnet9'"),
        (["table1", "--n2", "mlp_d0_h64"], "unknown model 'mlp_d0_h64'"),
        (["table1", "--regimes", "true_data,noise"], "unknown regime 'noise'; choose from true_data"),
        (["table1", "--seeds", "two"], "'two' is not an integer"),
        (["table1", "--seeds", "0"], "'0' must be positive"),
        (["table1", "--max-epochs", "-5"], "'-5' must be positive"),
        (["table1", "--subset", "1.5"], "'1.5' is not an integer"),
        (["table1", "--n1", ","], "names nothing"),
        (["table1", "--data-dir", "/nonexistent/data"], "data directory '/nonexistent/data' does not exist"),
        (["table1", "--device", "tpu"], "unknown device 'tpu'"),
        (["table1", "--device", "cuda:3"], "no CUDA GPU is available"),
        (["table1", "--subset", "40000"], "--subset 40000 exceeds"),
        (["table1", "--subset", "7"], "--subset 7 is smaller than the 10 classes of cifar10; give at least 10"),
        (["table14", "--n1", "vgg11"], "model 'vgg11' cannot run on mnist"),
        (["table1", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_one_line_exit_2(argv, expected, capsys, data_dir, tmp_path):
    if "--data-dir" not in argv:
        argv = argv + ["--data-dir", str(data_dir)]
    code, err = run(argv + ["--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_bad_recipe_file(tmp_path, capsys, data_dir):
    bad = tmp_path / "mine.toml"
    bad.write_text('title = "x"\ndataset = "cifar10"\nn1 = ["shallow_cnn_w16"]\nn3 = 1\n')
    code, err = run([str(bad), "--data-dir", str(data_dir)], capsys)
    assert code == 2
    assert "unknown field 'n3'" in err


def test_help_lists_recipes():
    out = subprocess.run([sys.executable, "-m", "engine.recipe", "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0
    for name in ("table1", "table3", "table10", "table11", "table14"):
        assert name in out.stdout


def test_subprocess_error_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.recipe", "table1", "--regimes", "bogus",
                          "--data-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown regime 'bogus'; choose from true_data, random_labels, random_images"]
