"""The Amazon Data Firehose transformation: decode, deduplicate, enrich, partition."""
