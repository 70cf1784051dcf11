"""Every user mistake on the command line: exit status 2, one line on stderr, no traceback.

Starting Python and torch costs seconds, so all cases run in ONE child process (``_DRIVER``
calls ``tilefx.cli.main`` per case, stderr captured, as ``python -m tilefx.cli`` would); two
cases also run as their own ``python -m tilefx.cli`` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tilefx.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


_DRIVER = """
import contextlib, io, json, sys
from tilefx.cli import main
results = []
for args in json.loads(sys.stdin.read()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(files: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case's (exit status, stderr), from one child process."""
    cases = {**{name: args for name, (args, _) in CASES.items()}, **file_cases(files)}
    child = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        cwd=ROOT,
        input=json.dumps(list(cases.values())),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout.splitlines()[-1])
    return {
        name: subprocess.CompletedProcess(args, code, "", err)
        for (name, args), (code, err) in zip(cases.items(), results, strict=True)
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    broken = root / "broken.toml"
    broken.write_text("[channels\nratio = 0.5\n")
    invalid = root / "invalid.toml"
    invalid.write_text("[channels]\nratio = 1.5\n")
    garbage = root / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    not_batches = root / "not_batches.pt"
    torch.save(torch.zeros(3), not_batches)
    not_saved = root / "not_saved"
    not_saved.mkdir()
    return {
        "broken": broken,
        "invalid": invalid,
        "garbage": garbage,
        "not_batches": not_batches,
        "dir": not_saved,
    }


MODEL = "tests.models:ConvBN"

CASES = {
    "missing module": (["optimize", "no_such_module:f", "--input", "1x3x8x8"], ["no_such_module"]),
    "not MODULE:FACTORY": (["optimize", "tests.models", "--input", "1x3x8x8"], ["MODULE:FACTORY"]),
    "missing factory": (["optimize", "tests.models:Nope", "--input", "1x3x8x8"], ["Nope"]),
    "missing recipe file": (
        ["optimize", MODEL, "--input", "1x3x8x8", "--recipe", "nope.toml"],
        ["nope.toml"],
    ),
    "bad --input shape": (["optimize", MODEL, "--input", "1xfoo"], ["--input", "1xfoo"]),
    "unknown dtype": (["optimize", MODEL, "--input", "x:1x3:float8"], ["float8"]),
    "too many colons": (["optimize", MODEL, "--input", "a:b:c:d"], ["--input"]),
    "no inputs": (["optimize", MODEL], ["--input"]),
    "missing --inputs file": (["optimize", MODEL, "--inputs", "nope.pt"], ["--inputs", "nope.pt"]),
    "missing out dir": (["compile", "no/such/dir"], ["no/such/dir"]),
    "missing out dir (bench)": (["bench", "no/such/dir"], ["no/such/dir"]),
    "unknown subcommand": (["frobnicate"], ["frobnicate"]),
    "unknown option": (["optimize", MODEL, "--input", "1x3x8x8", "--frob"], ["--frob"]),
    "bad --repeats": (["bench", "x", "--repeats", "0"], ["--repeats"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_one_line_and_exit_2(
    case: str, outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    assert_one_line_error(outcomes[case], *CASES[case][1])


@pytest.mark.parametrize("case", ["missing module", "bad --input shape"])
def test_as_its_own_process(case: str) -> None:
    args, words = CASES[case]
    assert_one_line_error(run(*args), *words)


FILE_CASES = {
    "broken TOML": ("broken", "--recipe", ["not valid TOML"]),
    "invalid recipe": ("invalid", "--recipe", ["ratio"]),
    "garbage --inputs": ("garbage", "--inputs", ["--inputs"]),
    "garbage --calibration": ("garbage", "--calibration", ["--calibration"]),
    "calibration not batches": ("not_batches", "--calibration", ["(inputs, labels)"]),
    "not a tilefx output": ("dir", "compile", ["manifest.json"]),
}


def file_cases(files: dict[str, Path]) -> dict[str, list[str]]:
    cases = {}
    for name, (key, option, _) in FILE_CASES.items():
        if option == "compile":
            cases[name] = ["compile", str(files[key])]
            continue
        extra = [] if option == "--inputs" else ["--input", "1x3x8x8"]
        cases[name] = ["optimize", MODEL, *extra, option, str(files[key])]
    return cases


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_file_is_one_line_and_exit_2(
    case: str, files: dict[str, Path], outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    key, _, words = FILE_CASES[case]
    assert_one_line_error(outcomes[case], str(files[key]), *words)
