"""The Kafka loop (`loop.KafkaLoop`) and the pass-through processor (`passthrough`)."""
