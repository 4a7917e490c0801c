"""SPEC section 2: Philox4x32-10 known answers, the stream layout, and the statistics of the normals."""

import math

import pytest
import torch

from fsgld_fused import reference as R

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in R.philox4x32(counter, key)) == expected


def test_philox_vectorised_matches_scalar_calls():
    blocks = torch.arange(0, 64, dtype=torch.int64) * 0x1234567 + 0xFFFFFFF0
    counter = (blocks & 0xFFFFFFFF, blocks >> 32, 7, 9)
    words = R.philox4x32(counter, (11, 13))
    for j in (0, 5, 63):
        b = int(blocks[j])
        one = R.philox4x32((b & 0xFFFFFFFF, b >> 32, 7, 9), (11, 13))
        assert [int(w[j]) for w in words] == [int(w) for w in one]


def test_uniform_mapping_is_exact_and_open():
    w = torch.tensor([0, 511, 512, 0xFFFFFFFF], dtype=torch.int64)
    u = R._uniform(w)
    assert u.dtype == torch.float32
    assert u.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, (2 * (2**23 - 1) + 1) * 2.0**-24]
    assert 0.0 < u.min() and u.max() < 1.0


BASE = dict(seed=2**64 - 3, pid=5, step=17, kind=0)


@pytest.mark.parametrize(
    "change", [dict(seed=2**64 - 4), dict(seed=(2**64 - 3) ^ (1 << 40)), dict(pid=6), dict(step=18), dict(kind=1)]
)
def test_every_stream_coordinate_changes_the_noise(change):
    a = R.normals(**BASE, numel=256)
    b = R.normals(**{**BASE, **change}, numel=256)
    assert not torch.equal(a, b)
    assert (a == b).float().mean() < 0.01  # not a shifted copy either


def test_element_index_changes_the_noise_and_blocks_have_four_lanes():
    n = R.normals(**BASE, numel=1024)
    assert torch.unique(n).numel() == n.numel()
    # lane i % 4 of block i // 4: the first four elements come from one Philox call
    w = R.philox4x32((0, 0, BASE["step"], BASE["pid"] << 1), (BASE["seed"] & 0xFFFFFFFF, BASE["seed"] >> 32))
    u = [R._uniform(x) for x in w]
    n0, n1 = R._box_muller(u[0], u[1])
    n2, n3 = R._box_muller(u[2], u[3])
    assert torch.equal(n[:4], torch.stack([n0, n1, n2, n3]))


@pytest.mark.parametrize("start,length", [(0, 10), (1, 7), (3, 1), (6, 100), (1021, 3), (4096 + 2, 513)])
def test_a_shard_draws_its_slice_of_the_unsharded_stream(start, length):
    full = R.normals(**BASE, numel=8192)
    shard = R.normals(**BASE, numel=length, offset=start)
    assert torch.equal(shard, full[start : start + length])


def test_block_counter_carries_into_its_high_word():
    offset = (2**32 - 2) * 4  # blocks 2**32 - 2 .. 2**32 + 1 straddle the 32-bit boundary
    n = R.normals(**BASE, numel=16, offset=offset)
    w_hi = R.philox4x32((0, 1, BASE["step"], BASE["pid"] << 1), (BASE["seed"] & 0xFFFFFFFF, BASE["seed"] >> 32))
    u = [R._uniform(x) for x in w_hi]
    assert torch.equal(n[8:10], torch.stack(R._box_muller(u[0], u[1])))


# ---- statistics: tolerances are multiples of the standard error of each statistic at n draws ----
N = 1 << 20


@pytest.fixture(scope="module")
def draws():
    return R.normals(seed=12345, pid=0, step=0, kind=0, numel=N).double()


def test_mean_and_variance(draws):
    assert abs(draws.mean().item()) < 5 / math.sqrt(N)  # SE of the mean: 1/sqrt(n)
    assert abs(draws.var().item() - 1.0) < 5 * math.sqrt(2.0 / N)  # SE of the variance: sqrt(2/n)
    assert abs((draws**4).mean().item() - 3.0) < 5 * math.sqrt(96.0 / N)  # kurtosis 3, Var(x^4) = 96


def test_kolmogorov_smirnov(draws):
    stats = pytest.importorskip("scipy.stats")
    d = stats.kstest(draws.numpy(), "norm").statistic
    assert d < 1.95 / math.sqrt(N)  # the alpha = 0.001 critical value of the KS statistic


@pytest.mark.parametrize(
    "other", [dict(seed=12345, pid=0, step=0, kind=1), dict(seed=12345, pid=0, step=1, kind=0), dict(seed=12345, pid=1, step=0, kind=0)]
)
def test_no_correlation_between_streams(draws, other):
    x = R.normals(**other, numel=N).double()
    r = torch.corrcoef(torch.stack([draws, x]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(N)  # SE of a correlation of independent samples: 1/sqrt(n)
    r_sq = torch.corrcoef(torch.stack([draws**2, x**2]))[0, 1].item()
    assert abs(r_sq) < 5 / math.sqrt(N)  # and no dependence through the shared radius


def test_lanes_of_one_block_are_uncorrelated(draws):
    lanes = draws.view(-1, 4).T
    c = torch.corrcoef(lanes)
    off = c - torch.eye(4, dtype=c.dtype)
    assert off.abs().max().item() < 5 / math.sqrt(N / 4)
    sq = torch.corrcoef(lanes**2) - torch.eye(4, dtype=c.dtype)  # Box-Muller pairs share r
    assert sq.abs().max().item() < 5 / math.sqrt(N / 4)
