"""Bottom floor: storage (local/S3), S3 retries, the root's lease, joining a Ray cluster."""
