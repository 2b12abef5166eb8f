"""A result line names a Hub id as the user gave it, not its snapshot folder's name (a 40-hex commit)."""

from __future__ import annotations

from test_inputs_hub_cache import COMMIT, hub  # noqa: F401  (hub: the Hub-cache fixture)


def test_prune_of_a_hub_id_names_the_id_not_the_snapshot_commit(hub, cli_run, tmp_path):  # noqa: F811
    r = cli_run("prune", "org/tiny-mixtral", "--ratio", "0.25", "--num-samples", "2", "--seq-len", "16",
                "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("org/tiny-mixtral: kept "), r.stdout
    assert COMMIT not in r.stdout
