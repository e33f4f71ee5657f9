"""What every service stands on: Kafka clients, the record pipeline, offsets, the result
cache, metrics, logging, asyncio helpers. Nothing domain-specific; imports only schemas."""
