"""Engines run shard jobs: ``local`` (processes over shards) and ``ray`` (Ray Data)."""
