"""ONNX Runtime: sessions for exported denoisers, ControlNets and modules."""
