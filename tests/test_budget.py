import pytest

from memfit.budget import Budget, format_bytes
from memfit.errors import BudgetError


@pytest.mark.parametrize("text,nbytes", [
    ("6GiB", 6 * 2**30), ("800MB", 800 * 10**6), ("1.5 GB", 1_500_000_000), ("512", 512),
    ("2kib", 2048), ("3G", 3 * 2**30), (1234, 1234), ("1e3KB", 10**6),
])
def test_parse_bytes(text, nbytes):
    assert Budget.parse(text).resolve(10**12) == nbytes


def test_parse_percentage_resolves_against_baseline():
    b = Budget.parse("50%")
    assert b.fraction == 0.5
    assert b.resolve(1000) == 500
    assert str(b) == "50%"


@pytest.mark.parametrize("bad", ["", "GiB", "6 parsecs", "-5MB", "0", "0%", "abc%", None, True, 1.5, [1]])
def test_malformed_budgets_raise_with_examples(bad):
    with pytest.raises(BudgetError) as e:
        Budget.parse(bad)
    assert "budget" in str(e.value).lower()


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(6 * 2**30) == "6.00 GiB"
