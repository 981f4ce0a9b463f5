"""EdgeTune: federated and split LoRA fine-tuning across edge devices over MQTT."""

__version__ = "0.1.0"
