"""Model code: the edge classifier, the split decoder, LoRA (through peft), pruning, ONNX export."""
