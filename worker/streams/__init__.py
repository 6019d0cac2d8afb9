"""DynamoDB Streams -> S3: change records as gzipped NDJSON (or Parquet) parts.

``images`` turns stream images into JSON-ready values; ``buffer`` wraps each
change in an envelope, groups changes by table and event hour, and writes
content-addressed part files exactly once.
"""
