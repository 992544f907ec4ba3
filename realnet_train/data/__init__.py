"""Data for RealNet: MVTec-layout images, streamed SIA shards, on-the-fly anomaly composition."""
