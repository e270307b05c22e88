"""Calibration data (text, jsonl, workloads, .npz) packed into seeded windows, and the streaming observers."""
