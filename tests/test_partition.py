import pytest

from data.partition import by_domain, dirichlet, iid, partition
from data.sentiment import DOMAINS, load_vader, train_test_split


@pytest.fixture(scope="module")
def train():
    return train_test_split()[0]


def _check_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)), "every example exactly once"


@pytest.mark.parametrize("name", ["iid", "dirichlet", "by-domain"])
@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_every_example_exactly_once_and_deterministic(train, name, k):
    labels = [e.label for e in train]
    domains = [e.domain for e in train]
    a = partition(name, labels=labels, domains=domains, k=k, seed=5)
    b = partition(name, labels=labels, domains=domains, k=k, seed=5)
    assert len(a) == k
    assert a == b
    _check_exact_cover(a, len(train))


def test_seed_changes_iid_and_dirichlet():
    assert iid(100, 4, seed=1) != iid(100, 4, seed=2)
    labels = [i % 2 for i in range(200)]
    assert dirichlet(labels, 4, 0.5, seed=1) != dirichlet(labels, 4, 0.5, seed=2)


def test_by_domain_gives_one_domain_per_agent(train):
    parts = by_domain([e.domain for e in train], 4)
    seen = [{train[i].domain for i in p} for p in parts]
    assert all(len(s) == 1 for s in seen)
    assert {d for s in seen for d in s} == set(DOMAINS)


def test_dirichlet_small_alpha_skews_labels():
    labels = [i % 2 for i in range(2000)]
    parts = dirichlet(labels, 5, alpha=0.1, seed=0)
    shares = [sum(labels[i] for i in p) / max(len(p), 1) for p in parts if p]
    assert max(shares) - min(shares) > 0.5  # strongly skewed; alpha=100 would be near 0.5 each


def test_test_split_is_fixed_and_disjoint():
    tr, te = train_test_split()
    tr2, te2 = train_test_split()
    assert [e.uid for e in te] == [e.uid for e in te2]
    assert not {e.uid for e in tr} & {e.uid for e in te}
    assert len(tr) + len(te) == len(load_vader())
    assert 0.18 < len(te) / (len(tr) + len(te)) < 0.22
    assert {e.domain for e in te} == set(DOMAINS)


def test_unknown_partition_names_the_choices():
    with pytest.raises(ValueError, match="by-domain"):
        partition("random", labels=[0], domains=["a"], k=1)
