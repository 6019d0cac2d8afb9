"""worker: an asyncio ingestion worker for AWS data pipelines."""
