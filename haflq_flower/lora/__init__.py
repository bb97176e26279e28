"""LoRA adapters as federated state: extraction, loading, aggregation math."""
