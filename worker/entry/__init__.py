"""Entry points: the CLI, the Lambda runtime and routing, the demo and sample data."""
