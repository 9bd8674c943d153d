"""Seeds of self-recurrence restarts (cones2_core.schedule.segment_seed)."""

from comfyui_cones2.cones2_core.schedule import segment_seed

SEEDS = (0, 1, 5, 2**32, 2**64 - 1)  # the host's seed widget allows 0 .. 2^64 - 1


def test_every_segment_of_every_seed_gets_its_own_seed_in_range():
    seeds = [segment_seed(s, k) for s in SEEDS for k in range(50)]
    assert len(set(seeds)) == len(seeds)  # no two (seed, segment) pairs share one: not seed + segment, not seed ^ k
    assert all(0 <= x < 2**63 for x in seeds)  # torch generators and Brownian trees take them
    assert not set(seeds) & set(SEEDS) and all(segment_seed(s, 0) != s for s in range(1000))  # never the step's own


def test_neighbouring_seeds_and_segments_are_unrelated():
    """One seed's sequence is not another's shifted (seed 5's restart 1 is not seed 6's restart 0), and a change of
    one in the seed or the segment changes about half of the 63 bits, as unrelated seeds do."""
    assert {segment_seed(5, k) for k in range(100)}.isdisjoint({segment_seed(6, k) for k in range(100)})
    flips = [bin(segment_seed(s, k) ^ segment_seed(s + ds, k + dk)).count("1")
             for s in range(40) for k in range(10) for ds, dk in ((1, 0), (0, 1))]
    assert 29 < sum(flips) / len(flips) < 34 and min(flips) >= 10
    for bit in range(63):  # every bit is used, about as often set as not
        share = sum(segment_seed(s, 3) >> bit & 1 for s in range(400)) / 400
        assert 0.4 < share < 0.6, bit


def test_known_values():
    """Pinned: the same seed gives the same images in every process and release (no per-process hash salt, no
    change of the derivation without a note in the changelog)."""
    assert [segment_seed(0, 0), segment_seed(0, 1), segment_seed(1, 0), segment_seed(2**64 - 1, 7)] == [
        5270446577184361118, 679332851012122859, 6551994104562591733, 7064102264578268311]
