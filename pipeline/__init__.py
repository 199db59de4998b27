"""The pipeline: a Faust worker that aggregates usage events per customer,
writes quota state to Redis and keeps the raw ledger in ClickHouse."""
