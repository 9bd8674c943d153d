"""Seeds of self-recurrence restarts."""

from cones2_core.schedule import segment_seed


def test_segment_seeds_are_fresh_determined_and_in_range():
    seeds = [segment_seed(s, k) for s in (0, 1, 2**64 - 1) for k in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= x < 2**63 for x in seeds)
    assert segment_seed(5, 3) == segment_seed(5, 3)
