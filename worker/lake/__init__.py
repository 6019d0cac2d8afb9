"""The lakehouse side of CDC: stream parts in S3 -> a Delta table that equals the source."""
