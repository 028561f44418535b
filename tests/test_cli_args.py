"""The argument types every subcommand shares: bad text becomes an argparse error that says
what was expected (argparse prints it as a usage error, never a traceback)."""

import argparse

import pytest

from halfstep.distill.cli_args import (
    positive_ints,
    positive_ints_or_empty,
    round_iterations,
    round_learning_rates,
)


def test_positive_ints():
    assert positive_ints("1, 2,4,") == [1, 2, 4]
    assert positive_ints_or_empty("") == []
    for bad, message in [("", "at least one"), ("1,x", "comma-separated"), ("0,2", "positive")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_ints(bad)


def test_round_iterations():
    assert round_iterations("4=500, 2=1000,") == {4: 500, 2: 1000}
    assert round_iterations("") == {}
    for bad, message in [
        ("4:500", "STEPS=ITERATIONS"),
        ("4=", "STEPS=ITERATIONS"),
        ("four=5", "STEPS=ITERATIONS"),
        ("4=0", ">= 1"),
        ("4=5,4=6", "twice"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            round_iterations(bad)


def test_round_learning_rates():
    assert round_learning_rates("128=5e-5,1=2e-4") == {128: 5e-5, 1: 2e-4}
    for bad, message in [("128=fast", "STEPS=LR"), ("4=0", "lr > 0"), ("0=1e-4", ">= 1"),
                         ("2=1e-4,2=2e-4", "twice")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            round_learning_rates(bad)


def test_bad_round_iters_is_a_usage_error(capsys):
    from halfstep.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", "t", "--out", "o", "--round-iters", "4:500"])
    assert exc.value.code == 2
    assert "STEPS=ITERATIONS" in capsys.readouterr().err
