"""Numbers out of range on the command line are usage errors naming the flag (exit 2, no traceback,
nothing started or written)."""

from __future__ import annotations

import pytest

from samtone_ray.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--print-config", "--replicas", "0"], "argument --replicas: must be >= 1, got 0"),
        (["serve", "--print-config", "--port", "70000"], "argument --port: must be >= 1 and <= 65535, got 70000"),
        (["serve", "--print-config", "--port", "0"], "argument --port: must be >= 1 and <= 65535, got 0"),
        (["serve", "--print-config", "--num-cpus", "-2"], "argument --num-cpus: must be > 0, got -2"),
        (["serve", "--print-config", "--num-cpus", "nan"], "argument --num-cpus: must be > 0, got nan"),
        (["encode", "--model", "m", "--input", "c.jsonl", "--output", "o", "--batch-size", "0"],
         "argument --batch-size: must be >= 1, got 0"),
        (["encode", "--model", "m", "--input", "c.jsonl", "--output", "o", "--cpus-per-actor", "-1"],
         "argument --cpus-per-actor: must be > 0, got -1"),
        (["encode", "--model", "m", "--input", "c.jsonl", "--output", "o", "--rows-per-file", "x"],
         "argument --rows-per-file: must be an integer, got 'x'"),
        (["encode", "--model", "m", "--input", "c.jsonl", "--output", "o", "--file-mb", "0"],
         "argument --file-mb: must be > 0, got 0"),
        (["eval", "--model", "m", "--data", "d", "--batch-size", "-5"], "argument --batch-size: must be >= 1, got -5"),
        (["index", "--embeddings", "e", "--output", "o", "--nprobe", "0"], "argument --nprobe: must be >= 1, got 0"),
        (["analyze", "--model", "m", "--data", "d", "--max-docs", "-1"], "argument --max-docs: must be >= 0, got -1"),
        (["submit", "train", "--num-cpus", "-1"], "argument --num-cpus: must be >= 0, got -1"),
        (["submit", "train", "--max-file-mb", "0"], "argument --max-file-mb: must be > 0, got 0"),
        (["jobs", "x", "--stop", "--timeout", "-3"], "argument --timeout: must be > 0, got -3"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr()
    assert exit_.value.code == 2 and message in err.err and "Traceback" not in err.err
    assert err.out == ""  # in particular, no half-valid `serve deploy` YAML
