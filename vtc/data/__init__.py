"""Shards to batches: LLaVA records and images decoded, streamed, grouped and collated into the batch
contract (batch.py); the converter from LLaVA JSON to shards; LLaVA benchmark files."""
