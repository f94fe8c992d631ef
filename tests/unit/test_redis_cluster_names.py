"""The key names of a ledger and a journal on a Redis Cluster (``actors._redis_cluster.namespace``): every key of
one ledger in one slot, as Redis hashes them (redis-py's ``key_slot`` follows Redis's rule); a single Redis's names
as before. No Redis."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from actors._redis_cluster import namespace

PREFIXES = ["smartbatch:budget", "{acme}:budget", "acme:{budget}", "a{}b", "a{}b{c}", "{}{x}", "x}{y", "{"]
SUFFIXES = [":exp", ":spend", ":specs", ":probe", ":w:tenant=acme/1d@1700000000", ":c:r1", ":s:r1", ":x:charge-9"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_key_of_a_ledger_on_a_cluster_hashes_to_one_slot(prefix):
    """Before (a review), a prefix whose first ``{`` closed at once (``a{}b{c}``) was taken as holding a hash tag
    already and used as given; Redis hashes such a key whole, so each key of the ledger went to its own slot, and
    every script met a key of another node (an outage for good)."""
    ns = namespace(prefix, True)
    assert len({key_slot((ns + s).encode()) for s in SUFFIXES}) == 1, ns


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_single_redis_keeps_the_prefix_as_given(prefix):
    assert namespace(prefix, False) == prefix


def test_a_journal_url_naming_another_database_on_a_cluster_names_the_prefix_setting_it_has():
    """The journal's keys take the cache's prefix (there is no ``journal.redis_prefix``): before, the error named
    that setting, which the settings refuse (a review). Checked before any Redis is asked."""
    from actors._redis_cluster import check_cluster_modes
    from engine.core.errors import ConfigError
    from engine.core.settings import Settings

    with pytest.raises(ConfigError, match=r"journal\.redis_url: .* names database 2") as err:
        check_cluster_modes(Settings(journal={"redis_url": "redis://127.0.0.1:1/2", "redis_cluster": True}))
    assert "cache.redis_prefix" in str(err.value) and "journal.redis_prefix" not in str(err.value)


@pytest.mark.parametrize("prefix", ["}{", "}{}", "}x", "}"])
def test_a_prefix_no_hash_tag_can_hold_is_refused_on_a_cluster_not_given_an_empty_tag(prefix):
    """``{`` + ``}{`` + ``}`` is ``{}{}``: an empty tag, which Redis hashes whole, so each key of the ledger or the
    journal went to a slot of its own and every script was refused, while the start's checks passed (a review;
    fails on the code before: no error, ``{}{}``). A single Redis keeps it as given."""
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match="redis_prefix"):
        namespace(prefix, True)
    assert namespace(prefix, False) == prefix


def test_every_prefix_on_a_cluster_gets_one_non_empty_tag_or_is_refused():
    """Every prefix of up to four of ``{``, ``}``, ``a``: its ledger's keys in one slot, or a ConfigError."""
    import itertools

    from actors._redis_cluster import has_hash_tag
    from engine.core.errors import ConfigError

    for n in range(1, 5):
        for chars in itertools.product("{}a", repeat=n):
            prefix = "".join(chars)
            try:
                ns = namespace(prefix, True)
            except ConfigError:
                assert prefix.startswith("}"), prefix
                continue
            assert has_hash_tag(ns), (prefix, ns)
            assert len({key_slot((ns + s).encode()) for s in SUFFIXES}) == 1, (prefix, ns)


@pytest.mark.parametrize("part", ["budgets", "journal"])
def test_a_cluster_s_prefix_no_tag_can_hold_is_refused_at_the_start_naming_its_setting(part):
    """Refused before any Redis is asked (port 1 answers nothing), with the setting to change: the budgets' own
    prefix, or the cache's for the journal (it has none of its own). The cache's keys take no tag: not refused."""
    from actors._redis_cluster import check_cluster_modes
    from engine.core.errors import ConfigError
    from engine.core.settings import Settings

    url = "redis://127.0.0.1:1/0"
    if part == "budgets":
        settings = Settings(budgets={"redis_url": url, "redis_cluster": True, "redis_prefix": "}{"})
    else:
        settings = Settings(journal={"redis_url": url, "redis_cluster": True}, cache={"redis_prefix": "}{"})
    setting = "budgets.redis_prefix" if part == "budgets" else "cache.redis_prefix"
    with pytest.raises(ConfigError, match=rf"setting {setting}: '\}}\{{' starts with"):
        check_cluster_modes(settings)
