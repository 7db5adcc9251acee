"""Orchestration only: DVC stage order and (later) Prefect flows. No ML logic here."""
