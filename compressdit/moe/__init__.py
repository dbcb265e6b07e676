"""Dense2MoE: dense FFNs -> mixtures of experts (routing primitives, MoE layers, neuron grouping, conversion)."""
