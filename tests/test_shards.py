"""The shard key scheme (queue/shards.py): slots as Redis Cluster computes them, tags spread evenly over the
slots, users spread evenly over the shards, and today's key names, byte for byte, with one Redis."""

from __future__ import annotations

from collections import Counter

import pytest
from pushgw.gateway.topology import LocalCluster
from pushgw.queue.keys import Keys
from pushgw.queue.shards import SLOTS, ShardMap, key_slot, shard_tags, slot_range


def test_key_slot_is_the_slot_redis_cluster_computes(cluster1: LocalCluster) -> None:
    keys = ["pushgw:stream", "{pushgw:3}:stream", "a{b}c", "a{}b", "{}", "x{y", "{a}{b}", "{{a}}", "é-ü", "",
            *(ShardMap.cluster("pushgw").keys(n).devices("learner-1") for n in range(16))]
    with cluster1.nodes[0].client() as c:
        assert [key_slot(k) for k in keys] == [c.execute_command("CLUSTER", "KEYSLOT", k) for k in keys]


@pytest.mark.parametrize("shards", [1, 3, 16, 64, 256])
def test_each_tag_hashes_into_its_own_even_slot_range(shards: int) -> None:
    tags = shard_tags("pushgw", shards)
    assert len(set(tags)) == shards
    for n, tag in enumerate(tags):
        assert key_slot("{" + tag + "}:stream") in slot_range(n, shards)
    assert sum(len(slot_range(n, shards)) for n in range(shards)) == SLOTS


def test_sixteen_shards_spread_evenly_over_three_masters(cluster3: LocalCluster) -> None:
    per_master = Counter(
        next(i for i, (lo, hi) in enumerate(cluster3.slot_ranges()) if lo <= key_slot(k.stream) <= hi)
        for k in ShardMap.cluster("pushgw", 16).all_keys()
    )
    assert sorted(per_master.values()) == [5, 5, 6]


def test_every_key_a_shard_script_touches_shares_the_shards_slot() -> None:
    shards = ShardMap.cluster("pushgw", 16)
    for n in range(16):
        k = shards.keys(n)
        slots = {key_slot(x) for x in (k.stream, k.stream_high, k.delayed, k.delayed_data, k.dead, k.idem("m-1"),
                                       k.done("1-0:x"), k.devices("u"), k.user("u"), k.cap("u", "c"), k.burst("u"),
                                       k.invalid_tokens)}
        assert len(slots) == 1


def test_users_spread_evenly_over_shards() -> None:
    shards = ShardMap.cluster("pushgw", 16)
    counts = Counter(shards.shard_of(f"learner-{i}") for i in range(16000))
    assert len(counts) == 16 and max(counts.values()) < 1100 and min(counts.values()) > 900  # 1000 each, +-10%
    assert shards.user_keys("learner-7") == shards.keys(shards.shard_of("learner-7"))


def test_one_redis_keeps_todays_key_names() -> None:
    single = ShardMap.single("pushgw")
    assert single.count == 1 and single.shard_of("anyone") == 0
    k = single.user_keys("learner-1")
    assert k == Keys("pushgw") == single.keys(0) == single.shared
    assert (k.stream, k.stream_high, k.delayed, k.dead, k.idem("m"), k.devices("u")) == (
        "pushgw:stream", "pushgw:stream:high", "pushgw:delayed", "pushgw:dead", "pushgw:idem:m", "pushgw:devices:u")


def test_shard_count_is_bounded() -> None:
    with pytest.raises(ValueError, match="between 1 and 1024"):
        ShardMap.cluster("pushgw", 0)
    with pytest.raises(ValueError, match="between 1 and 1024"):
        ShardMap.cluster("pushgw", 1025)
